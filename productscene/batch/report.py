"""What a batch job tells its caller: progress while it runs, a summary at the end."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Progress:
    total: int
    done: int
    failed: int
    running: float        # sampling progress of the prompts in flight, in rows (0 .. in flight)
    servers_up: int
    servers: int
    last: str = ""        # the row that just finished or failed


@dataclass
class Summary:
    rows: int
    skipped: int                      # done by an earlier run (--resume)
    done: int
    failed: list[tuple[str, str, str]]  # (where, output, why)
    servers: dict                     # url -> {"rows": n, "down": bool}
    seconds: float
    interrupted: bool = False
    discarded: int = 0                # results of a row that another server had already delivered
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else (1 if self.failed else 0)

    def message(self) -> str:
        lines = list(self.notes)
        head = f"{self.rows} rows: {self.done} done" + (f", {self.skipped} already done" if self.skipped else "")
        head += f", {len(self.failed)} failed" + (", interrupted" if self.interrupted else "")
        lines.append(head + f" in {self.seconds:.1f} s")
        for url, s in self.servers.items():
            lines.append(f"  {url}: {s['rows']} rows" + ("; stopped answering" if s["down"] else ""))
        if self.failed:
            lines.append("failed rows:")
            lines.extend(f"  {where} ({output}): {why}" for where, output, why in self.failed)
        if self.interrupted:
            lines.append("interrupted: run the same command with --resume to finish the unfinished rows")
        elif self.failed:
            lines.append("run the same command with --resume to retry only the failed rows")
        return "\n".join(lines)
