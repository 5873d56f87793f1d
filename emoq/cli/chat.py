"""`emoq chat`: ask a trained model about a clip — one question, or an interactive multi-clip session.

A model trained with transcripts reads the clip's words: --text for the --audio clip, else the ASR
model's transcript (the run config's model.asr, default builtin:whisper-tiny.en, or --asr), made once
per clip. The transcript used and its source (gold, asr, none) are printed on stderr before the answer.
"""

from __future__ import annotations

import sys


def run_chat(args) -> int:
    from ..audio import AudioError
    from ..inference import EmotionRecognizer

    asr = {"asr": args.asr} if args.asr is not None else {}
    recognizer = EmotionRecognizer.from_pretrained(args.model, device=args.device, **asr)
    if not recognizer.can_chat:
        sys.exit(f"emoq chat: {args.model}: {recognizer.no_chat_message()}")
    if args.text and not recognizer.use_transcript:
        print("emoq chat: this model was trained without transcripts; --text is ignored", file=sys.stderr)
    try:
        clip = recognizer.load(args.audio)
    except AudioError as err:
        sys.exit(f"emoq chat: {err}")
    transcript = _transcript(recognizer, clip, args.text)
    if args.question:
        _answer(recognizer, clip, transcript, " ".join(args.question), args, history=[])
        return 0
    return _session(recognizer, clip, transcript, args, AudioError)


def _transcript(recognizer, clip, text: str | None):
    """The transcript the model reads for `clip` (made once, used for every question about the clip),
    reported on stderr when the model reads transcripts."""
    used = recognizer.transcripts([clip], [text])[0]
    if recognizer.use_transcript:
        line = "transcript: none" if used.source == "none" else f"transcript ({used.source}): {used.text}"
        print(line, file=sys.stderr, flush=True)
    return used


def _session(recognizer, clip, transcript, args, audio_error) -> int:
    """Multi-turn conversation: every answer stays in the context of the next question until the clip changes.
    A clip switched to with /audio has no given transcript: the ASR model's is used."""
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
            transcript = _transcript(recognizer, clip, None)
            continue
        history.append((line, _answer(recognizer, clip, transcript, line, args, history)))
    return 0


def _answer(recognizer, clip, transcript, question: str, args, history: list[tuple[str, str]]) -> str:
    """Stream one answer to stdout and return it whole."""
    from ..audio import SAMPLE_RATE

    pieces = []
    for piece in recognizer.chat(clip, question, text=transcript, stream=True, max_new_tokens=args.max_new_tokens,
                                 sample_rate=SAMPLE_RATE, history=history):
        print(piece, end="", flush=True)
        pieces.append(piece)
    print()
    return "".join(pieces).strip()


def add_parser(subparsers):
    p = subparsers.add_parser("chat", help="ask a trained model about a clip (one-shot, or a multi-turn session)")
    p.add_argument("--model", required=True, help="trained model folder")
    p.add_argument("--audio", required=True, help="audio file (wav, flac, mp3, mp4, ...)")
    p.add_argument("--text", default=None,
                   help="transcript of the --audio clip, if known (otherwise the ASR model transcribes it, "
                   "when the model reads transcripts)")
    p.add_argument("--asr", default=None, metavar="REF",
                   help="ASR model for clips without --text (builtin:*, hub id or folder; default: the run "
                   "config's model.asr; none: no ASR)")
    p.add_argument("question", nargs="*", help="the question; omit it for an interactive session")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default=None)
    p.set_defaults(func=run_chat)
    return p
