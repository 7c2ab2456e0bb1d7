"""Class-incremental schedules: which of its classes a site trains on in each round.

`schedule` in the config maps a site id to stages, each `{from_round: R, classes: [...]}`:

    schedule:
      0: [{from_round: 1, classes: [dog, rooster]}, {from_round: 6, classes: [pig, cow]}]

From round R until the next stage the site trains only on those classes (its other clips wait). A site
not in the schedule trains on all its classes every round. Held-out clips are always all scored; the
server reports accuracy on the classes seen so far and forgetting per class.
"""

from __future__ import annotations


def check_schedule(schedule: dict | None, site_classes: list[list[str]], num_rounds: int) -> None:
    """ValueError naming the site, stage and bad value unless every stage is usable."""
    for site, stages in (schedule or {}).items():
        where = f"schedule.{site}"
        if not isinstance(site, int) or not 0 <= site < len(site_classes):
            raise ValueError(f"{where}: site {site!r} is not allowed; expected a site id 0..{len(site_classes) - 1}")
        if not stages:
            raise ValueError(f"{where} is empty; expected a list of {{from_round: R, classes: [...]}}")
        last = 0
        for i, stage in enumerate(stages):
            if set(stage) != {"from_round", "classes"}:
                raise ValueError(f"{where}[{i}] has keys {sorted(stage)}; expected exactly from_round and classes")
            r = stage["from_round"]
            if not isinstance(r, int) or r <= last or (i == 0 and r != 1):
                need = "1 (the first stage starts the run)" if i == 0 else f"an integer > {last}"
                raise ValueError(f"{where}[{i}].from_round={r!r} is not allowed; expected {need}")
            if r > num_rounds:
                raise ValueError(f"{where}[{i}].from_round={r} is after the last round (num_rounds={num_rounds})")
            last = r
            if not stage["classes"]:
                raise ValueError(f"{where}[{i}].classes is empty; a stage trains at least one class")
            for c in stage["classes"]:
                if c not in site_classes[site]:
                    raise ValueError(f"{where}[{i}].classes names {c!r}, which site {site} holds no clips of; "
                                     f"site {site} holds {site_classes[site]}")


def held_classes(clips: list, sites: list[list[int]]) -> list[list[str]]:
    """Class names each site holds clips of, from `federation()`'s clips and site indices."""
    return [sorted({clips[i].category for i in site}) for site in sites]


def stage_classes(schedule: dict | None, site: int, rnd: int) -> list[str] | None:
    """Class names site `site` trains on in round `rnd`; None = all of its classes."""
    stages = (schedule or {}).get(site)
    if not stages:
        return None
    return list([s for s in stages if s["from_round"] <= rnd][-1]["classes"])


def seen_classes(schedule: dict | None, site_classes: list[list[str]], rnd: int) -> set[str]:
    """Classes any site has trained on in rounds 1..rnd."""
    seen = set()
    for site, held in enumerate(site_classes):
        stages = (schedule or {}).get(site)
        if not stages:
            seen |= set(held)
        else:
            seen |= {c for s in stages if s["from_round"] <= rnd for c in s["classes"]}
    return seen
