"""Recordings of a trajectory stream: files that replay a run exactly (docs/recording-format.md)."""

from miles_stream.record.format import RecordingWriter, read_recording, recording_files
from miles_stream.record.source import RecordingSource

__all__ = ["RecordingSource", "RecordingWriter", "read_recording", "recording_files"]
