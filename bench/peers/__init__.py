"""MEMIT and AlphaEdit, written here from their papers for side-by-side runs (no code from their
repositories): Meng et al. 2023, "Mass-Editing Memory in a Transformer" (ICLR), and Fang et al.
2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models" (ICLR).

Both locate a fact at its subject's last token, optimise a residual-stream target there at the top
of a range of layers, and spread the change over that range's `down_proj` weights lowest first;
they differ in the solve (`peers.locate`). `edit(loaded, facts, ...)` returns a `qfedit.delta.Delta`,
so the same judging code measures them and qfedit.
"""

from peers.locate import PeerConfig, peer_delta

__all__ = ["PeerConfig", "peer_delta"]
