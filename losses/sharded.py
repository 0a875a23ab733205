"""Model-parallel margin softmax (Partial FC).

Each rank holds a contiguous slice of the class centres (split as `np.array_split`; a head with k
sub-centres per class holds the k weight rows of each of its classes). A step all-gathers the
embeddings and labels of the global batch, computes the logits of the local classes, and evaluates
softmax cross-entropy across ranks from an all-reduced max and sum of exponentials, so no rank ever
materialises (global batch x all classes).

Partial FC sampling (`sample_rate` < 1, arcface_torch's): in a training step each rank keeps the
centres of the classes of the global batch that live on it (the positives) plus random negatives, in
all max(1, int(sample_rate * local classes)) columns (every positive, even if there are more); the
softmax runs over the union of the ranks' kept columns and only those centres get a gradient. The
draw is seeded by (sample_seed, rank, draw count); the count is saved with the head (`sample_draws`),
so a resumed run draws on. With `sample_rate` = 1 nothing is sampled and the head is the full softmax.
`score()` always uses every class.

Gradient convention (the training loop relies on it):
- the head is NOT wrapped in DDP: each rank's weight slice gets exactly dLoss/dW_slice;
- the local embeddings get world_size x dLoss/d(local embeddings). The backbone IS wrapped in DDP,
  which averages its gradients over ranks; the sum over ranks of the per-rank chain rule is the
  gradient of the global-batch mean loss, so the average of world_size x (each rank's part) is
  exactly the single-process gradient on the global batch.

Inter-class filtering (`set_interclass_filter(t)`, t in (0, 1); 0: off, the default, which changes nothing):
in a training step a row of the global batch whose margin-free cosine to some class centre other than its
label's exceeds t is left out of the loss: see `_interclass_weights`.

With world_size == 1 no torch.distributed call is made.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from losses.registry import get_head


def class_split(num_classes: int, world_size: int) -> List[Tuple[int, int]]:
    """[start, end) class range of every rank, as np.array_split: the first (C % W) ranks get one more."""
    base, extra = divmod(num_classes, world_size)
    bounds, start = [], 0
    for r in range(world_size):
        end = start + base + (1 if r < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def resplit_rows(parts: List[torch.Tensor], num_classes: int, world_size: int, rank: int,
                 subcenters: int = 1) -> torch.Tensor:
    """Rank `rank`'s rows (of `world_size`) of a class-sharded tensor saved as `parts`, the shards of another
    number of ranks in rank order, `subcenters` rows per class: the rows of classes [start, end) of their
    concatenation, bitwise."""
    rows = sum(int(p.shape[0]) for p in parts)
    if rows != num_classes * subcenters:
        per_class = f" x {subcenters} sub-centres" if subcenters > 1 else ""
        raise ValueError(f"resplit_rows: the {len(parts)} shards hold {rows / subcenters:g} classes{per_class}, "
                         f"expected {num_classes}")
    start, end = class_split(num_classes, world_size)[rank]
    return torch.cat(list(parts))[start * subcenters:end * subcenters].clone()


class ShardComm:
    """The collectives a sharded head needs, on one process group."""

    def __init__(self, group, rank: int, world_size: int):
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.src = 0 if group is None else dist.get_global_rank(group, 0)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` on every rank."""
        t = t.clone().contiguous()
        dist.broadcast(t, src=self.src, group=self.group)
        return t

    def sizes(self, n: int, device) -> List[int]:
        """Every rank's first-dimension size (ranks may hold different batch sizes)."""
        mine = torch.tensor([n], dtype=torch.long, device=device)
        out = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine, group=self.group)
        return [int(x) for x in out]

    def all_gather_cat(self, t: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        """Concatenate every rank's `t` (first dims `sizes`) along dim 0, in rank order."""
        pad = max(sizes)
        t = t.contiguous()
        if t.shape[0] < pad:
            t = torch.cat([t, t.new_zeros((pad - t.shape[0],) + tuple(t.shape[1:]))])
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t, group=self.group)
        return torch.cat([o[:n] for o, n in zip(out, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather of the local embeddings; backward sums the gathered gradient over ranks and returns
    world_size x the local rows (see the module docstring)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, comm: ShardComm, sizes: List[int]):
        ctx.comm, ctx.sizes = comm, sizes
        return comm.all_gather_cat(local, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        comm, sizes = ctx.comm, ctx.sizes
        total = comm.all_reduce_sum(grad.contiguous())
        start = sum(sizes[:comm.rank])
        return total[start:start + sizes[comm.rank]] * comm.world_size, None, None


class _ShardedSoftmaxCE(torch.autograd.Function):
    """Mean softmax cross-entropy of logits split by columns over ranks.

    forward(logits (N, C_local), rows, cols, comm, weights) -> (loss scalar, log_prob (N,)); rows/cols index the
    labelled class of the rows whose class is local; `weights` (N,) multiply each row's cross-entropy before the
    mean over N (None: weight 1, the plain mean). Backward: weight * (softmax - onehot) / N per slice."""

    @staticmethod
    def forward(ctx, logits, rows, cols, comm: Optional[ShardComm], weights: Optional[torch.Tensor] = None):
        n = logits.shape[0]
        stats = _softmax_stats(logits, rows, cols, comm)
        ctx.save_for_backward(stats["exp"], stats["sumexp"], rows, cols, weights)
        ctx.n = n
        log_prob = stats["target"] - stats["max"] - torch.log(stats["sumexp"])
        loss = -log_prob.mean() if weights is None else -(weights * log_prob).mean()
        ctx.mark_non_differentiable(log_prob)
        return loss, log_prob

    @staticmethod
    def backward(ctx, grad_loss, _grad_log_prob):
        exp, sumexp, rows, cols, weights = ctx.saved_tensors
        grad = exp / sumexp[:, None]
        grad[rows, cols] -= 1.0
        grad *= grad_loss / ctx.n
        if weights is not None:
            grad *= weights[:, None]
        return grad, None, None, None, None


def _softmax_stats(logits, rows, cols, comm: Optional[ShardComm]) -> Dict[str, torch.Tensor]:
    """Global row max, exp(logits - max), sum of exp over all classes, labelled-class logit (N,)."""
    row_max = logits.max(dim=1).values
    if comm is not None:
        row_max = comm.all_reduce_max(row_max)
    exp = torch.exp(logits - row_max[:, None])
    sumexp = exp.sum(dim=1)
    target = torch.zeros_like(row_max)
    target[rows] = logits[rows, cols]
    if comm is not None:
        both = comm.all_reduce_sum(torch.stack([sumexp, target]))
        sumexp, target = both[0], both[1]
    return {"max": row_max, "exp": exp, "sumexp": sumexp, "target": target}


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    was_training = module.training
    module.train(False)
    try:
        yield
    finally:
        module.train(was_training)


class ShardedClassifier(nn.Module):
    """Margin head `head_name` over `num_classes` classes, split across `world_size` ranks.

    forward(local_embeddings (n, D), local_labels (n,)) -> (loss, gt_prob):
      loss: scalar, mean cross-entropy over the GLOBAL batch (identical on every rank);
      gt_prob: (n,) float32, detached, softmax probability of the labelled class WITH margin; with
        `sample_rate` < 1 in training mode it is the SAMPLED softmax's (its denominator leaves out the
        negatives not drawn, so it is higher than the full one); `score()` gives the full one.
    Every rank must call forward / score / full_state_dict together (they are collectives).
    Labels are global class ids in [0, num_classes)."""

    interclass_filter = 0.0  # cosine threshold of inter-class filtering (0: off); set_interclass_filter sets it
    last_filtered = None  # (n,) bool of the local rows the last filtering step left out (None: filtering off)

    def __init__(self, head_name: str, in_features: int, num_classes: int, rank: int = 0, world_size: int = 1,
                 group=None, sample_rate: float = 1.0, sample_seed: int = 0, **head_kwargs):
        super().__init__()
        if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
            raise ValueError(f"ShardedClassifier: sample_rate={sample_rate!r} must be in (0, 1] (1: every class)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardedClassifier: rank {rank} is not in a world of {world_size}")
        if num_classes < world_size:
            raise ValueError(f"ShardedClassifier: {num_classes} classes cannot be split over {world_size} ranks")
        if world_size > 1:
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError("ShardedClassifier with world_size > 1 needs torch.distributed initialised")
            if dist.get_world_size(group) != world_size or dist.get_rank(group) != rank:
                raise ValueError(f"ShardedClassifier: rank/world_size {rank}/{world_size} disagree with the process "
                                 f"group's {dist.get_rank(group)}/{dist.get_world_size(group)}")
        self.num_classes = num_classes
        self.in_features = in_features
        self.rank, self.world_size = rank, world_size
        self.bounds = class_split(num_classes, world_size)
        self.class_start, self.class_end = self.bounds[rank]
        self.head = get_head(head_name, in_features, self.class_end - self.class_start, **head_kwargs)
        self.head_name = self.head.head_name
        self.comm = ShardComm(group, rank, world_size) if world_size > 1 else None
        self.head.shard_comm = self.comm
        self.sample_rate = float(sample_rate)
        self.sample_seed = int(sample_seed)
        self.num_sample = max(1, int(self.sample_rate * (self.class_end - self.class_start)))
        self._draws = 0  # the host copy of `sample_draws`: reading the buffer would sync the device
        if self.sample_rate < 1:
            self.register_buffer("sample_draws", torch.zeros((), dtype=torch.long))

    @property
    def s(self) -> float:
        return self.head.s

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, classes=[{self.class_start}, {self.class_end}), "
                f"rank={self.rank}, world_size={self.world_size}, sample_rate={self.sample_rate}")

    @property
    def sampling(self) -> bool:
        """True when a training step uses a sample of the negative classes (Partial FC)."""
        return self.sample_rate < 1 and self.training

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "sample_draws" in state_dict:
            self._draws = int(state_dict[prefix + "sample_draws"])

    # ---------------------------------------------------------------------------- batch plumbing
    def _global_batch(self, local_embeddings, local_labels, with_grad: bool):
        """(embeddings (N, D), labels (N,), local row range, every rank's row count or None in one process) of the
        global batch."""
        local_labels = local_labels.reshape(-1).to(device=local_embeddings.device, dtype=torch.long)
        n = local_embeddings.shape[0]
        if local_labels.numel() != n:
            raise ValueError(f"ShardedClassifier: {local_labels.numel()} labels for {n} embeddings")
        if self.comm is None:
            return local_embeddings, local_labels, (0, n), None
        sizes = self.comm.sizes(n, local_embeddings.device)
        if with_grad:
            embeddings = _GatherWithGrad.apply(local_embeddings, self.comm, sizes)
        else:
            embeddings = self.comm.all_gather_cat(local_embeddings.detach(), sizes)
        labels = self.comm.all_gather_cat(local_labels, sizes)
        start = sum(sizes[:self.rank])
        return embeddings, labels, (start, start + n), sizes

    def _local_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Global class ids -> column in this slice, -1 where the class lives on another rank."""
        if labels.numel():
            low, high = torch.aminmax(labels)
            low, high = torch.stack([low, high]).tolist()  # one host-device sync, not two
            if low < 0 or high >= self.num_classes:
                raise ValueError(f"ShardedClassifier: labels must be in [0, {self.num_classes}), got [{low}, {high}]")
        here = (labels >= self.class_start) & (labels < self.class_end)
        return torch.where(here, labels - self.class_start, torch.full_like(labels, -1))

    def _target_cos(self, cos: torch.Tensor, local_labels: torch.Tensor) -> Optional[torch.Tensor]:
        """(N,) labelled-class cosine of every row, summed from the one rank that holds each class."""
        return None if self.comm is None else self._labelled(cos, local_labels)

    def _labelled(self, values: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """(N, ...) float32 `values` (N, local classes, ...) of every row's labelled class, summed from the one
        rank that holds each class (zero on the others)."""
        rows = (local_labels >= 0).nonzero().squeeze(1)
        target = torch.zeros((values.shape[0],) + tuple(values.shape[2:]), device=values.device, dtype=torch.float32)
        target[rows] = values.detach()[rows, local_labels[rows]]
        return target if self.comm is None else self.comm.all_reduce_sum(target)

    # --------------------------------------------------------------------------------- training
    def sample_columns(self, local: torch.Tensor) -> torch.Tensor:
        """Sorted local columns a sampled step uses: every positive (a class of the global batch on this
        rank), then random negatives up to `num_sample` columns."""
        positive = torch.unique(local[local >= 0])  # sorted
        if positive.numel() >= self.num_sample:
            return positive
        gen = torch.Generator(device=local.device)
        gen.manual_seed((self.sample_seed * 1_000_003 + self._draws) * 8191 + self.rank)
        self._draws += 1
        self.sample_draws.fill_(self._draws)
        score = torch.rand(self.class_end - self.class_start, generator=gen, device=local.device)
        score[positive] = 2.0  # positives first
        return score.topk(self.num_sample).indices.sort().values

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor,
                local_weights: Optional[torch.Tensor] = None, per_sample: bool = False):
        """(loss, gt_prob) of the local batch, or with `per_sample` (loss, gt_prob, sample_loss): the local rows'
        cross-entropy (n,), detached, the head's own loss before the mean (margin and, with Partial FC in
        training, the sampled softmax included). `local_weights` (n,) multiply the rows' losses before the
        mean over the global batch (dynamic pruning's reweighting); None is the plain mean. With inter-class
        filtering on (training mode), the rows it leaves out weigh 0 and the loss is the mean over the others
        (`_interclass_weights`); `last_filtered` then holds the local rows left out."""
        with torch.autocast(device_type=local_embeddings.device.type, enabled=False):
            embeddings, labels, (lo, hi), sizes = self._global_batch(local_embeddings, local_labels, with_grad=True)
            weights = None
            if local_weights is not None:
                weights = local_weights.reshape(-1).to(device=embeddings.device, dtype=torch.float32)
                if weights.numel() != local_embeddings.shape[0]:
                    raise ValueError(f"ShardedClassifier: {weights.numel()} weights for {local_embeddings.shape[0]} "
                                     f"embeddings")
                if self.comm is not None:  # the ranks' row counts are the embeddings': no second exchange of them
                    weights = self.comm.all_gather_cat(weights, sizes)
            local = self._local_labels(labels)
            if self.sampling:
                columns = self.sample_columns(local)
                position = torch.full((self.class_end - self.class_start,), -1, dtype=torch.long, device=local.device)
                position[columns] = torch.arange(columns.numel(), device=local.device)
                local = torch.where(local >= 0, position[local.clamp_min(0)], local)
                cos = self.head.cosine(embeddings, columns)  # a head with sub-centres: all k rows of each column
            else:
                cos = self.head.cosine(embeddings)
            if self.interclass_filter > 0 and self.training:
                filtered = self._interclass_filtered(cos, local)
                self.last_filtered = filtered[lo:hi]
                weights = self._interclass_weights(filtered, weights)
            logits = self.head.margin_logits(cos, local, self._target_cos(cos, local), embeddings)
            rows = (local >= 0).nonzero().squeeze(1)
            loss, log_prob = _ShardedSoftmaxCE.apply(logits, rows, local[rows], self.comm, weights)
        log_prob = log_prob[lo:hi].detach()
        return (loss, torch.exp(log_prob), -log_prob) if per_sample else (loss, torch.exp(log_prob))

    # ---------------------------------------------------------------------------- inter-class filtering
    def set_interclass_filter(self, threshold: float) -> None:
        """Turn inter-class filtering on at cosine `threshold` in (0, 1), or off with 0."""
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
            raise ValueError(f"ShardedClassifier: interclass_filter={threshold!r} must be in [0, 1) (a cosine; 0: off)")
        self.interclass_filter = float(threshold)
        self.last_filtered = None

    def _interclass_filtered(self, cos: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """(N,) bool, the same on every rank: the rows of the global batch whose largest margin-free cosine to a
        class centre other than their label's exceeds `interclass_filter`. `cos` (N, columns) holds this rank's
        columns, `local` the labelled column of each row (-1: on another rank); each rank takes the max over its
        non-label columns, then the max over the ranks. With Partial FC sampling `cos` holds the sampled
        columns only: the max is over the sampled centres, so a close identity that was not drawn is not seen."""
        other = cos.detach().clone()
        rows = (local >= 0).nonzero().squeeze(1)
        other[rows, local[rows]] = -2.0  # below any cosine: the label's own centre never counts
        row_max = other.max(dim=1).values
        if self.comm is not None:
            row_max = self.comm.all_reduce_max(row_max)
        return row_max > self.interclass_filter

    @staticmethod
    def _interclass_weights(filtered: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
        """(N,) loss weights of the global batch with the `filtered` rows left out: 0 for them, and the others'
        weights (1, or dynamic pruning's) times N / (rows kept), so that the mean over N that the loss takes is
        the mean over the rows kept and the step size does not shrink with the number filtered. Every row
        filtered: every weight 0, a loss of 0 with zero gradient (no NaN).

        This is a rule on samples. arcface_torch's `interclass_filtering_threshold` instead zeroes the offending
        negative logits (the classes, not the sample) and keeps the sample in the loss. The head's own batch
        statistics (e.g. CurricularFace's t, AdaFace's norm statistics) still see every row."""
        kept = (~filtered).to(torch.float32)
        scale = filtered.numel() / kept.sum().clamp_min(1.0)
        kept = kept * scale
        return kept if weights is None else weights * kept

    # ---------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def score(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor,
              topk: int = 0) -> Dict[str, torch.Tensor]:
        """Per local sample (detached): 'gt_prob_with_margin', 'gt_prob' (margin-free), 'pred' (int64
        global arg-max class, margin-free; ties -> lowest class id), 'pred_prob', the geometry `_geometry` gives
        ('label_cos', 'other_cos', 'other_class'); with topk > 0 also
        'topk_logits' (n, k) float32 and 'topk_index' (n, k) int64 (margin-free, descending),
        'rest_mean_logit' (n,), the mean margin-free logit of the other classes (NaN if none), and
        'label_logit' (n,), the margin-free logit s * cos_y of the labelled class (the scale of topk_logits);
        for a head with k > 1 sub-centres also 'label_subcenter_cos' (n, k) float32, the cosines to the labelled
        class's sub-centres (cos_y is their largest). The head's statistics are not updated and Elastic heads
        use their mean margin."""
        if not 0 <= topk <= self.num_classes:
            raise ValueError(f"score: topk={topk} must be in [0, {self.num_classes}]")
        with torch.autocast(device_type=local_embeddings.device.type, enabled=False), _eval_mode(self.head):
            embeddings, labels, (lo, hi), _ = self._global_batch(local_embeddings, local_labels, with_grad=False)
            local = self._local_labels(labels)
            rows = (local >= 0).nonzero().squeeze(1)
            cols = local[rows]
            if self.head.subcenters > 1:
                per_subcenter = self.head.subcenter_cosine(embeddings)
                cos = per_subcenter.max(dim=2).values  # = head.cosine(embeddings)
            else:
                cos = self.head.cosine(embeddings)
            with_margin = self.head.margin_logits(cos, local, self._target_cos(cos, local), embeddings)
            plain = cos * self.head.s

            stats = _softmax_stats(with_margin, rows, cols, self.comm)
            out = {"gt_prob_with_margin": torch.exp(stats["target"] - stats["max"] - torch.log(stats["sumexp"]))}
            stats = _softmax_stats(plain, rows, cols, self.comm)
            out["gt_prob"] = torch.exp(stats["target"] - stats["max"] - torch.log(stats["sumexp"]))
            # The arg-max class has logit == the global max: pred_prob = exp(0) / sumexp.
            out["pred_prob"] = 1.0 / stats["sumexp"]
            out["pred"] = self._global_argmax(plain, stats["max"])
            out.update(self._geometry(cos, rows, cols))
            if self.head.subcenters > 1:
                out["label_subcenter_cos"] = self._labelled(per_subcenter, local)
            if topk > 0:
                values, index = self._global_topk(plain, topk)
                out["topk_logits"], out["topk_index"] = values, index
                total = plain.sum(dim=1)
                if self.comm is not None:
                    total = self.comm.all_reduce_sum(total)
                rest = self.num_classes - topk
                out["rest_mean_logit"] = ((total - values.sum(dim=1)) / rest if rest
                                          else torch.full_like(total, float("nan")))
                out["label_logit"] = stats["target"]  # of `plain`, summed from the rank holding the class
        return {k: v[lo:hi].detach() for k, v in out.items()}

    def _geometry(self, cos: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Where each sample lies among the class centres (margin-free cosines, what the angle-based cleaning rules
        read): 'label_cos', the cosine to its labelled class's centre; 'other_cos', the largest cosine to
        another class's centre, and 'other_class', that class (ties: the lowest id; NaN and -1 with one class)."""
        label_cos = torch.zeros(cos.shape[0], device=cos.device, dtype=torch.float32)
        label_cos[rows] = cos[rows, cols]
        others = cos.index_put((rows, cols), torch.tensor(float("-inf"), device=cos.device))
        other_max = others.max(dim=1).values if others.shape[1] else torch.full_like(label_cos, float("-inf"))
        if self.comm is not None:
            label_cos = self.comm.all_reduce_sum(label_cos)
            other_max = self.comm.all_reduce_max(other_max)
        other_class = self._global_argmax(others, other_max)
        none = torch.isinf(other_max)  # one class: no other centre
        return {"label_cos": label_cos, "other_cos": other_max.masked_fill(none, float("nan")),
                "other_class": other_class.masked_fill(none, -1)}

    def _global_argmax(self, plain: torch.Tensor, global_max: torch.Tensor) -> torch.Tensor:
        local_max, local_arg = plain.max(dim=1)
        # Lowest global class id among the ranks that reach the global max (torch.argmax's tie rule).
        candidate = torch.where(local_max == global_max, local_arg + self.class_start,
                                torch.full_like(local_arg, self.num_classes))
        if self.comm is not None:
            candidate = -self.comm.all_reduce_max(-candidate)
        return candidate

    def _global_topk(self, plain: torch.Tensor, k: int):
        k_local = min(k, plain.shape[1])
        values, index = plain.topk(k_local, dim=1)
        index = index + self.class_start
        if self.comm is None:
            return values, index
        n = plain.shape[0]
        pad = k - k_local  # a rank with fewer than k classes pads with -inf
        if pad:
            values = torch.cat([values, values.new_full((n, pad), float("-inf"))], dim=1)
            index = torch.cat([index, index.new_full((n, pad), -1)], dim=1)
        both = torch.cat([values, index.to(values.dtype)], dim=1)  # class ids < 2^24 are exact in float32
        gathered = [torch.empty_like(both) for _ in range(self.world_size)]
        dist.all_gather(gathered, both.contiguous(), group=self.comm.group)
        all_values = torch.cat([g[:, :k] for g in gathered], dim=1)
        all_index = torch.cat([g[:, k:] for g in gathered], dim=1).long()
        best_values, pos = all_values.topk(k, dim=1)
        return best_values, all_index.gather(1, pos)

    # ----------------------------------------------------------------------------- checkpoints
    @property
    def full_weight_shape(self) -> Tuple[int, int]:
        """(num_classes * subcenters, in_features): the shape of the whole head's weight."""
        return self.num_classes * self.head.subcenters, self.in_features

    def describe_weight_shape(self, classes: str = "classes", features: str = "in_features") -> str:
        """The full weight's shape with what its sides count, e.g. '(11, 16): (classes, in_features)', or
        '(33, 16): (classes x 3 sub-centres, in_features)' for a head with sub-centres."""
        k = self.head.subcenters
        return f"{self.full_weight_shape}: ({classes}{f' x {k} sub-centres' if k > 1 else ''}, {features})"

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The single-head state dict (same keys as get_head's module) with the full weight
        (num_classes * subcenters, in_features), gathered from all ranks. Buffers are the same on every rank."""
        state = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        if self.comm is not None:
            sizes = [(end - start) * self.head.subcenters for start, end in self.bounds]
            state["weight"] = self.comm.all_gather_cat(state["weight"], sizes)
        return state

    def load_full_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Load a single-head state dict (full weight), keeping this rank's slice."""
        weight = state.get("weight")
        if weight is None or tuple(weight.shape) != self.full_weight_shape:
            found = None if weight is None else tuple(weight.shape)
            raise ValueError(f"head state dict: expected 'weight' of shape {self.describe_weight_shape()}, "
                             f"found {found}")
        k = self.head.subcenters
        sliced = dict(state)
        sliced["weight"] = weight[self.class_start * k:self.class_end * k]
        self.head.load_state_dict(sliced, strict=True)
