"""PassManager: run passes in order, with progress, and collect their reports."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from blockprune.passes.base import Pass, PassReport


@dataclass
class PassManager:
    passes: list[Pass]
    show_progress: bool = True
    reports: list[PassReport] = field(default_factory=list)

    def run(self, model: onnx.ModelProto) -> onnx.ModelProto:
        from tqdm.auto import tqdm

        bar = tqdm(self.passes, desc="passes", unit="pass", disable=not self.show_progress, leave=False)
        for p in bar:
            bar.set_postfix_str(p.name)
            model, report = p.run(model)
            self.reports.append(report)
        return model
