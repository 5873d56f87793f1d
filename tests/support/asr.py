"""A stand-in for Whisper in tests: it "hears" a clip's length and records every call."""


class CountingTranscriber:
    """Stands in for Whisper: "heard N samples" for a clip of N samples, and a record of every call."""

    name = "stub-asr"

    def __init__(self):
        self.calls: list[list[int]] = []

    @property
    def clips(self) -> int:
        """How many clips were transcribed, over every call."""
        return sum(len(call) for call in self.calls)

    def transcribe(self, clips):
        self.calls.append([len(c) for c in clips])
        return [f"heard {len(c)} samples" for c in clips]
