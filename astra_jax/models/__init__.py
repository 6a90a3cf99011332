"""Models. None of them names a mesh: attention goes through SequenceAttention."""
