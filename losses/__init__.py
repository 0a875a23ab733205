"""Margin heads behind one registry, their defaults table, and the rank-sharded classifier.

    head = get_head("CosFace", 512, num_classes)              # s=64, m=0.35 from HEAD_DEFAULTS
    logits = head(embeddings, labels)                         # (N, num_classes) float32, for cross-entropy
    clf = ShardedClassifier("CosFace", 512, num_classes, rank, world_size)
    loss, gt_prob = clf(local_embeddings, local_labels)       # see losses/sharded.py for the gradient convention

Adding a head: a `@register_head` class in losses/heads.py and its row in HEAD_DEFAULTS.
"""
from losses.registry import HEAD_DEFAULTS, canonical_head_name, get_head, list_heads, register_head
from losses.heads import MarginHead, arc_margin  # noqa: E402  (importing registers the heads)
from losses.sharded import ShardedClassifier, class_split  # noqa: E402

__all__ = ["HEAD_DEFAULTS", "MarginHead", "ShardedClassifier", "arc_margin", "canonical_head_name", "class_split",
           "get_head", "list_heads", "register_head"]
