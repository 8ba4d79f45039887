"""What runs around training: the ``torchkeel`` command line, the demo, run reports, plots, export."""
