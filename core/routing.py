"""Which replica a request goes to (SPEC section 13): one rule for the simulator, its reference and the server.

A shared waiting room (``shared_queue``, the default and what our server's GPU pool does)
needs no rule: the next replica with room takes the head. A gateway in front of separate
engines (vLLM or SGLang replicas behind llm-d, a Kubernetes service, LiteLLM) must
choose at arrival, and the request then waits in that replica's own queue:

- ``round_robin``: each replica in turn, whatever it holds or runs;
- ``least_loaded``: fewest sequences running plus waiting there, lowest index on a tie;
- ``prefix_affinity``: the replica holding the longest cached prefix of the prompt (its
  leading KV blocks already resident there skip their prefill), as llm-d's inference
  scheduler scores it. Affinity must not queue a request where another replica would
  start it now, or a popular system prompt would pile onto one replica: so the rule
  looks first among the replicas that would admit the request at their next step (a
  sequence slot left after those running and waiting there), and only when none would,
  at the least loaded. Ties on the prefix go to the lighter load, then to the replica
  next in turn (as round robin would): a new system prompt on an idle fleet finds no
  replica holding it, and a fixed order would put every new prompt on the first.
  (Waiting for the next step end is not queueing: every request does. A first version
  that also excluded replicas with anyone waiting sent 3% of a steady shared-prefix
  load away from its cached prompt, each arrival during a step, at a prefill's cost.)

Loads and hits are the caller's, measured its own way (the engine from its GPUs, the
reference from its processes, the server from its workers' feeds and caches); this
module only decides, so the three decide alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from .model import Routing

__all__ = ["choose_replica"]


def choose_replica(
    routing: Routing, loads: Sequence[int], free: Sequence[bool], hits: Sequence[int] | None, turn: int
) -> int:
    """The index of the replica for the next request.

    ``loads``: sequences running plus waiting per replica; ``free``: whether it would admit
    the request at its next step (a sequence slot left for it); ``hits``: leading prompt blocks of this request resident
    there (``prefix_affinity``; None or zeros without a cache); ``turn``: requests routed
    before this one (``round_robin``).
    """
    n = len(loads)
    if routing is Routing.ROUND_ROBIN:
        return turn % n
    if routing is Routing.PREFIX_AFFINITY and hits is not None:
        pool = [g for g in range(n) if free[g]]
        if pool:
            return min(pool, key=lambda g: (-hits[g], loads[g], (g - turn) % n))
        return min(range(n), key=lambda g: (loads[g], -hits[g], (g - turn) % n))
    return min(range(n), key=lambda g: (loads[g], g))
