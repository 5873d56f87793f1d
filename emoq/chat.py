"""`emoq chat`: ask a trained model about a clip — one question, or an interactive multi-clip session."""

from __future__ import annotations

import sys


def run_chat(args) -> int:
    from .inference import EmotionRecognizer

    recognizer = EmotionRecognizer.from_pretrained(args.model, device=args.device)
    if args.question:
        for piece in recognizer.chat(args.audio, " ".join(args.question), text=args.text, stream=True,
                                     max_new_tokens=args.max_new_tokens):
            print(piece, end="", flush=True)
        print()
        return 0
    audio = args.audio
    print(f"clip: {audio}  (/audio PATH switches clips, /quit ends)")
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line.startswith("/audio "):
            audio = line.split(" ", 1)[1].strip()
            print(f"clip: {audio}")
            continue
        for piece in recognizer.chat(audio, line, text=args.text, stream=True, max_new_tokens=args.max_new_tokens):
            print(piece, end="", flush=True)
        print()
    return 0


def add_parser(subparsers):
    p = subparsers.add_parser("chat", help="ask a trained model about a clip (one-shot or interactive)")
    p.add_argument("--model", required=True, help="trained model folder")
    p.add_argument("--audio", required=True, help="audio file (wav, flac, mp3, mp4, ...)")
    p.add_argument("--text", default=None, help="transcript of the clip, if known")
    p.add_argument("question", nargs="*", help="the question; omit it for an interactive session")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default=None)
    p.set_defaults(func=run_chat)
    return p
