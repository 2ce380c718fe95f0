"""Run control: what a run checks before it starts (`preflight`), its checkpoints and resume
(`checkpoint`), its stop requests, lock and requeue marker (`stop`), and its output files
(`run_files`)."""
