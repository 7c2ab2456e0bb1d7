"""Which SuperNode serves which site, how many sites the federation has, and which sites failed a round.

The number of sites is the federation's (the SuperNodes' `num-partitions`); rounds go on as long as
`federation.min_sites` of them answer, and a failure is named with its site and its first reason.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger(__name__)


SIZE_PROBES = 8  # SuperNodes asked for the federation's size before round 1


class RoundFailed(RuntimeError):
    """A round ended with fewer sites than `federation.min_sites`, or too few SuperNodes are connected."""


def short_reason(reason: str) -> str:
    """The gist of a site's error reply (Flower sends a remote traceback): one line, at most 300 characters."""
    lines = [line for line in str(reason).splitlines() if line.strip()] or ["error without a reason"]
    text = reason.rsplit("Message: ", 1)[1] if "Message: " in reason else lines[-1]
    return " ".join(text.split()).rstrip("'>")[:300]


def query_sites(grid: Grid, nodes: list[int], timeout: float) -> dict[int, tuple[int, int]]:
    """Node -> (partition-id, num-partitions or 0) as each node reports it (a "query.site" message)."""
    msgs = [Message(content=RecordDict(), message_type="query.site", dst_node_id=n) for n in nodes]
    return {r.metadata.src_node_id: (int(r.content["metrics"]["site"]), int(r.content["metrics"]["num-partitions"]))
            for r in grid.send_and_receive(msgs, timeout=timeout) if not r.has_error()}


def learn_sites(grid: Grid, nodes: list[int], site_of_node: dict[int, int], num_sites: int, timeout: float) -> None:
    """Ask nodes whose site (partition id) is not in `site_of_node` yet (first sampled, joined late, or new after a
    resume) and add them; refuse one whose num-partitions or partition-id disagrees with the federation's size.
    Called with a round's sampled nodes, so what is learnt grows with the sample, not the federation."""
    ask = [n for n in nodes if n not in site_of_node]
    for node, (site, size) in (query_sites(grid, ask, timeout) if ask else {}).items():
        if size and size != num_sites:
            raise RoundFailed(f"SuperNode {node} (partition-id={site}) has num-partitions={size} but the "
                              f"federation has {num_sites} sites; start it with num-partitions={num_sites}")
        if not 0 <= site < num_sites:
            raise RoundFailed(f"SuperNode {node} has partition-id={site}: expected 0..{num_sites - 1} for "
                              f"{num_sites} sites")
        site_of_node[node] = site


def federation_size(grid: Grid, asked: int, timeout: float, explicit: bool) -> tuple[int, dict[int, int]]:
    """The number of sites is the federation's: the num-partitions its SuperNodes report (`asked`, the
    config's, when none do); and node -> site. Refused, naming both numbers: SuperNodes that disagree, or
    an `explicit` config that asked for another size."""
    start = time.monotonic()
    while not (nodes := list(grid.get_node_ids())):
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"no SuperNode connected within federation.timeout={timeout} s")
        time.sleep(1)
    # node -> (partition-id, num-partitions) of a few nodes: the rest are asked when first sampled (learn_sites), so
    # start-up does not grow with the federation (a 10,000-site run spent minutes here asking every node)
    reports = query_sites(grid, sorted(nodes)[:SIZE_PROBES], timeout)
    sizes = sorted({size for _, size in reports.values() if size})
    if len(sizes) > 1:
        raise ValueError(f"SuperNodes disagree on num-partitions: {sizes}; give every SuperNode the same "
                         "--node-config num-partitions=N")
    have = sizes[0] if sizes else asked
    if have != asked and explicit:
        raise ValueError(f"federation.num_sites={asked} but the federation has {have} SuperNodes (num-partitions="
                         f"{have}); set federation.num_sites={have}, or start {asked} SuperNodes (simulation: "
                         f"flwr run --federation-config num-supernodes={asked})")
    if out := sorted(site for site, _ in reports.values() if not 0 <= site < have):
        raise ValueError(f"SuperNodes with partition-id {out}: expected 0..{have - 1} for {have} sites")
    if have != asked:
        log.warning("federation.num_sites=%d but the federation has %d SuperNodes: the run has %d sites", asked,
                    have, have)
    return have, {node: site for node, (site, _) in reports.items()}


def wait_for_sites(grid: Grid, server_round: int, min_sites: int, timeout: float) -> None:
    """Go on as soon as `min_sites` SuperNodes are connected (FedAvg would wait for all of them, forever
    when one has died); stop after `timeout` seconds with fewer."""
    start = time.monotonic()
    while len(nodes := list(grid.get_node_ids())) < min_sites:
        waited = time.monotonic() - start
        if waited > timeout:
            raise RoundFailed(f"round {server_round}: only {len(nodes)} SuperNodes connected after "
                              f"federation.timeout={timeout:.0f} s; federation.min_sites={min_sites}")
        if waited < 1:
            log.info("round %s: waiting for SuperNodes: %d connected, federation.min_sites=%d",
                     server_round, len(nodes), min_sites)
        time.sleep(1)


class FailureLog:
    """Round -> site -> the first reason it failed; stops the run when a round loses more sites than allowed."""

    def __init__(self, num_sites: int, min_sites: int):
        self.num_sites, self.min_sites = num_sites, min_sites
        self.rounds: dict[int, dict[str, str]] = {}

    def count(self, server_round: int) -> int:
        """Sites that failed some step of `server_round`."""
        return len(self.rounds.get(server_round, {}))

    def note(self, server_round: int, step: str, replies: list[Message], sent: list[Message],
             site_of: dict[int, int], rejected: dict[int, str] | None = None) -> set[int]:
        """Record each site that failed `step` (an error reply, no reply to a message in `sent`, or a reply the
        server `rejected`: node -> why); return the failed nodes. Raise RoundFailed when more sites failed this
        round than federation.min_sites allows."""
        # by the message answered: the SuperLink's own error replies (node unavailable) come from node 1
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        answered = {node_of.get(m.metadata.reply_to_message_id, m.metadata.src_node_id): m for m in replies}
        failed = {node: short_reason(m.error.reason) for node, m in answered.items() if m.has_error()}
        failed |= {n: "no reply within federation.timeout" for n in set(node_of.values()) - set(answered)}
        failed |= rejected or {}
        row = self.rounds.setdefault(server_round, {})
        for node, reason in failed.items():
            who = f"site {site_of[node]}" if node in site_of else f"node {node}"
            row.setdefault(who, f"{step}: {reason}")
            log.warning("round %s: %s failed in %s: %s", server_round, who, step, reason)
        if not row:
            del self.rounds[server_round]
        elif len(row) > self.num_sites - self.min_sites:
            who, why = next(iter(row.items()))
            raise RoundFailed(f"round {server_round}: {len(row)} of {self.num_sites} sites failed, more than "
                              f"federation.min_sites={self.min_sites} allows; first: {who}: {why}")
        return set(failed)
