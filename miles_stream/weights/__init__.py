"""Versioned weights: the trainer publishes, producers follow.

    versions.py    WeightPublisher / WeightSubscriber: versions drawn, announced on {ns}:weights, pruned
    manifest.py    what a version is: tensors, dtypes, chunks and their checksums
    transports.py  how its bytes travel: redis chunks, files;  cuda_ipc.py, broadcast.py: GPU paths
    background.py  the trainer's publisher thread;  group.py: the broadcast group's config (no torch)

Nothing is imported here, so that `group.py` (a section of the run config) loads without torch.
"""
