"""Serving weight versions: one loaded base model whose weights hold a version (`model`, no
database), and the follower that keeps it on what an alias points at (`follower`).

    versioned = VersionedModel(load_model(path), base_label="demo@0")
    versioned.switch_to(delta_3, "demo@3")         # only the tensors that differ are written
    reply = versioned.answer("who founded Oxinnovate?")
    reply.text, reply.version                      # ("Qi", "demo@3")
"""

from qfedit.serving.follower import AliasFollower, FollowerState, follow_alias, load_version_delta
from qfedit.serving.model import Answer, PromptTooLongError, ReadWriteLock, SwitchReport, VersionedModel

__all__ = [
    "AliasFollower",
    "Answer",
    "FollowerState",
    "PromptTooLongError",
    "ReadWriteLock",
    "SwitchReport",
    "VersionedModel",
    "follow_alias",
    "load_version_delta",
]
