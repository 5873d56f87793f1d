"""`emoq chat`: ask a trained model about a clip — one question, or an interactive multi-clip session."""

from __future__ import annotations

import sys


def run_chat(args) -> int:
    from ..audio import AudioError
    from ..inference import EmotionRecognizer

    recognizer = EmotionRecognizer.from_pretrained(args.model, device=args.device)
    if not recognizer.can_chat:
        sys.exit(f"emoq chat: {args.model}: {recognizer.no_chat_message()}")
    try:
        clip = recognizer.load(args.audio)
        if args.question:
            _answer(recognizer, clip, " ".join(args.question), args, history=[])
            return 0
    except AudioError as err:
        sys.exit(f"emoq chat: {err}")
    return _session(recognizer, clip, args, AudioError)


def _session(recognizer, clip, args, audio_error) -> int:
    """Multi-turn conversation: every answer stays in the context of the next question until the clip changes."""
    history: list[tuple[str, str]] = []
    print(f"clip: {args.audio}  (/audio PATH switches clips, /reset forgets the conversation, /quit ends)")
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history = []
            print("(conversation reset)")
            continue
        if line.startswith("/audio "):
            path = line.split(" ", 1)[1].strip()
            try:
                clip = recognizer.load(path)
            except audio_error as err:
                print(f"error: {err}; still on the previous clip")
                continue
            history = []
            print(f"clip: {path}")
            continue
        history.append((line, _answer(recognizer, clip, line, args, history)))
    return 0


def _answer(recognizer, clip, question: str, args, history: list[tuple[str, str]]) -> str:
    """Stream one answer to stdout and return it whole."""
    from ..audio import SAMPLE_RATE

    pieces = []
    for piece in recognizer.chat(clip, question, text=args.text, stream=True, max_new_tokens=args.max_new_tokens,
                                 sample_rate=SAMPLE_RATE, history=history):
        print(piece, end="", flush=True)
        pieces.append(piece)
    print()
    return "".join(pieces).strip()


def add_parser(subparsers):
    p = subparsers.add_parser("chat", help="ask a trained model about a clip (one-shot, or a multi-turn session)")
    p.add_argument("--model", required=True, help="trained model folder")
    p.add_argument("--audio", required=True, help="audio file (wav, flac, mp3, mp4, ...)")
    p.add_argument("--text", default=None, help="transcript of the clip, if known")
    p.add_argument("question", nargs="*", help="the question; omit it for an interactive session")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default=None)
    p.set_defaults(func=run_chat)
    return p
