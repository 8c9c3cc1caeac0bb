"""The training side: tethered models (one or stacked), their step loop, triggers,
surge/collapse dynamics and checkpoints. It sees the coordinator only through
`ensemble.protocol`; it never imports coordination or runtime."""
