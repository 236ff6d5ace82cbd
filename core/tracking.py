"""
Where a run's numbers go: metrics.jsonl in its out_dir (always; plot.py draws it) and SwanLab
(--use_swanlab, online, local or offline). Only rank 0 writes.
"""

import json
from dataclasses import asdict


class Tracker:
    """metrics.jsonl (always) and SwanLab (--use_swanlab) on rank 0."""

    def __init__(self, cfg, out_dir, resumed_step, master):
        self.master, self.run = master, None
        self.path = out_dir / "metrics.jsonl"
        if not master:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resumed_step is not None and self.path.exists():
            # drop the records a killed run wrote after its last checkpoint (and a half-written line)
            keep = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["step"] <= resumed_step:
                        keep.append(line + "\n")
                except (json.JSONDecodeError, KeyError):
                    pass
            self.path.write_text("".join(keep), encoding="utf-8")
        if cfg.use_swanlab and cfg.swanlab_mode != "disabled":
            import swanlab  # imported only when used; the mode is always explicit, so it never asks to log in
            mode = "online" if cfg.swanlab_mode == "cloud" else cfg.swanlab_mode
            self.run = swanlab.init(project="k-model", name=f"{cfg.kind}-{out_dir.name}", mode=mode,
                                    log_dir=str(out_dir / "swanlog"), config=asdict(cfg))

    def log(self, record):
        if not self.master:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def finish(self):
        if self.run is not None:
            self.run.finish()
