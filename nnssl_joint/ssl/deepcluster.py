"""DeepCluster-v2 (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting
Cluster Assignments", Sec. 3 / App. "DeepCluster-v2"), the k-means alternative to SwAV codes for
L_intra / L_inter of the AAAI 2023 paper (Nguyen et al.).

Each epoch, spherical k-means (several heads, each with its own K) clusters a memory bank holding
the latest embedding of every training sample; during the next epoch a sample's pseudo-label in
head h is its cluster, and the loss is the cross-entropy between softmax(C_h z / tau) and that label,
with the centroids C_h fixed. The memory bank is keyed by a *global* sample index
(:class:`GlobalIndex`) so that samples of different datasets never share an entry (the authors'
release let them collide).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnssl_joint.ssl.distributed import (
    all_gather_cat,
    all_reduce_,
    rank_sizes,
    use_distributed,
    world_size_and_rank,
)


@dataclass
class _IndexedDataset:
    name: str
    offset: int
    spec: int | list[int]  # as registered: a sample count (one item per case) or per-case item counts
    item_offsets: list[int] | None  # cumulative per-case item counts (None for a plain count)

    @property
    def num_cases(self) -> int:
        return self.spec if self.item_offsets is None else len(self.item_offsets) - 1

    @property
    def size(self) -> int:
        return self.spec if self.item_offsets is None else self.item_offsets[-1]

    def case_start(self, case: int) -> int:
        return case if self.item_offsets is None else self.item_offsets[case]

    def case_size(self, case: int) -> int:
        return 1 if self.item_offsets is None else self.item_offsets[case + 1] - self.item_offsets[case]


class GlobalIndex:
    """Collision-free global sample indices for memory banks across several datasets.

    Register each dataset with its number of samples (one item per case, e.g. 2D images), or with
    its per-case item counts (e.g. the number of slices of every volume). Registration order
    defines the offsets, so register in a fixed order (e.g. the plans' dataset order) on every
    rank and in every run; :meth:`to_dict` / :meth:`from_dict` store and rebuild it.

    >>> index = GlobalIndex()
    >>> index.register("xray", 100)          # 100 images, ids 0..99
    0
    >>> index.register("ct", [40, 60])       # 2 volumes with 40 and 60 slices, ids 100..199
    100
    >>> index.index("ct", case=1, item=5)
    145
    """

    def __init__(self) -> None:
        self._datasets: dict[str, _IndexedDataset] = {}
        self._size = 0

    def register(self, name: str, sizes: int | Sequence[int]) -> int:
        """Add a dataset; ``sizes`` is its sample count, or a per-case count of items. Returns its offset."""
        if name in self._datasets:
            raise ValueError(
                f"dataset {name!r} is already registered in this GlobalIndex; use a unique name."
            )
        if isinstance(sizes, Sequence):
            spec: int | list[int] = [int(s) for s in sizes]
            negative = any(s < 0 for s in spec)
            item_offsets: list[int] | None = [0]
            for size in spec:
                item_offsets.append(item_offsets[-1] + size)
        else:
            spec = int(sizes)
            negative = spec < 0
            item_offsets = None
        if negative:
            raise ValueError(
                f"dataset {name!r}: sizes must be a non-negative count or a list of them, got {sizes}."
            )
        dataset = _IndexedDataset(name, self._size, spec, item_offsets)
        self._datasets[name] = dataset
        self._size += dataset.size
        return dataset.offset

    @property
    def size(self) -> int:
        """Total number of global indices (the memory bank size)."""
        return self._size

    def __len__(self) -> int:
        return self._size

    @property
    def names(self) -> list[str]:
        return list(self._datasets)

    def offset(self, name: str) -> int:
        return self._dataset(name).offset

    def index(self, name: str, case: int, item: int = 0) -> int:
        """Global index of item ``item`` (e.g. slice) of case ``case`` in dataset ``name``."""
        dataset = self._dataset(name)
        if not 0 <= case < dataset.num_cases:
            raise ValueError(f"dataset {name!r} has {dataset.num_cases} cases, got case {case}.")
        if not 0 <= item < dataset.case_size(case):
            raise ValueError(
                f"case {case} of dataset {name!r} has {dataset.case_size(case)} items, got item {item}."
            )
        return dataset.offset + dataset.case_start(case) + item

    def indices(self, name: str, cases: Tensor, items: Tensor | None = None) -> Tensor:
        """Vectorised :meth:`index` for tensors of case (and item) numbers."""
        dataset = self._dataset(name)
        cases = cases.long()
        items = torch.zeros_like(cases) if items is None else items.long().to(cases.device)
        if cases.numel() and (int(cases.min()) < 0 or int(cases.max()) >= dataset.num_cases):
            raise ValueError(
                f"dataset {name!r} has {dataset.num_cases} cases; got case numbers outside that range."
            )
        if dataset.item_offsets is None:
            starts, case_sizes = cases, torch.ones_like(cases)
        else:
            offsets = torch.tensor(dataset.item_offsets, dtype=torch.long, device=cases.device)
            starts, case_sizes = offsets[cases], offsets[cases + 1] - offsets[cases]
        if items.numel() and bool(((items < 0) | (items >= case_sizes)).any()):
            raise ValueError(f"dataset {name!r}: some item numbers are outside their case's item count.")
        return dataset.offset + starts + items

    def lookup(self, global_index: int) -> tuple[str, int, int]:
        """Inverse of :meth:`index`: (dataset name, case, item)."""
        if not 0 <= global_index < self._size:
            raise ValueError(f"global index {global_index} outside 0..{self._size - 1}.")
        for dataset in self._datasets.values():
            local = global_index - dataset.offset
            if 0 <= local < dataset.size:
                if dataset.item_offsets is None:
                    return dataset.name, local, 0
                case = bisect.bisect_right(dataset.item_offsets, local) - 1
                return dataset.name, case, local - dataset.item_offsets[case]
        raise AssertionError("unreachable: the datasets' ranges cover 0..size-1")

    def to_dict(self) -> dict[str, int | list[int]]:
        """Per dataset, in registration order, its sizes as registered (enough to rebuild it)."""
        return {name: dataset.spec for name, dataset in self._datasets.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, int | Sequence[int]]) -> GlobalIndex:
        index = cls()
        for name, sizes in data.items():
            index.register(name, sizes)
        return index

    def _dataset(self, name: str) -> _IndexedDataset:
        if name not in self._datasets:
            raise ValueError(f"dataset {name!r} is not registered; registered: {self.names}.")
        return self._datasets[name]


def _last_occurrence(indices: Tensor) -> Tensor:
    """Positions of the last occurrence of every distinct value of ``indices`` (deterministic dedup)."""
    unique, inverse = torch.unique(indices, return_inverse=True)
    positions = torch.arange(indices.numel(), device=indices.device)
    last = torch.full((unique.numel(),), -1, dtype=torch.long, device=indices.device)
    return last.scatter_reduce(0, inverse, positions, reduce="amax")


class MemoryBank(nn.Module):
    """The latest embedding of every sample, per view, keyed by global sample index.

    Under torch.distributed every :meth:`update` all-gathers the indices and embeddings of all
    ranks, so each rank holds the complete bank: a checkpoint written by rank 0 restores it fully.
    """

    embeddings: Tensor
    filled: Tensor

    def __init__(self, size: int, dim: int, num_views: int = 1, distributed: bool | None = None) -> None:
        super().__init__()
        if size < 1 or dim < 1 or num_views < 1:
            raise ValueError(
                f"MemoryBank needs size, dim and num_views >= 1, got {size}, {dim}, {num_views}."
            )
        self.size = size
        self.dim = dim
        self.num_views = num_views
        self.distributed = distributed
        self.register_buffer("embeddings", torch.zeros(num_views, size, dim))
        self.register_buffer("filled", torch.zeros(size, dtype=torch.bool))

    @property
    def num_filled(self) -> int:
        return int(self.filled.sum())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A bank built without knowing the dataset (a network rebuilt from a checkpoint record) takes the
        # size of the bank it loads; the trainer checks the size against its own sample index first.
        incoming = state_dict.get(prefix + "filled")
        if isinstance(incoming, Tensor) and incoming.dim() == 1 and incoming.shape[0] != self.size:
            self.size = int(incoming.shape[0])
            self.embeddings = self.embeddings.new_zeros((self.num_views, self.size, self.dim))
            self.filled = self.filled.new_zeros(self.size)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @torch.no_grad()
    def update(self, indices: Tensor, embeddings: Tensor | Sequence[Tensor]) -> None:
        """Store ``embeddings`` at global ``indices`` (B,).

        ``embeddings``: one (B, D) tensor per view (a sequence of ``num_views``), a (V, B, D)
        tensor, or a single (B, D) tensor when ``num_views == 1``. Later rows win on duplicates.
        """
        if isinstance(embeddings, Tensor):
            embeddings = embeddings.unsqueeze(0) if embeddings.dim() == 2 else embeddings
        else:
            embeddings = torch.stack([z.detach() for z in embeddings])
        batch = indices.shape[0]
        if embeddings.shape != (self.num_views, batch, self.dim):
            raise ValueError(
                f"MemoryBank.update expects {self.num_views} view(s) of ({batch}, {self.dim}) embeddings, "
                f"got {tuple(embeddings.shape)}."
            )
        indices = indices.detach().long().to(self.embeddings.device)
        if batch and (int(indices.min()) < 0 or int(indices.max()) >= self.size):
            raise ValueError(
                f"memory bank indices must lie in 0..{self.size - 1}; use GlobalIndex to build them."
            )
        rows = embeddings.detach().to(self.embeddings).transpose(0, 1).contiguous()  # (B, V, D)
        distributed = use_distributed(self.distributed)
        sizes = rank_sizes(batch, self.embeddings.device, distributed)
        indices = all_gather_cat(indices, distributed, sizes)
        rows = all_gather_cat(rows, distributed, sizes)
        keep = _last_occurrence(indices)
        indices, rows = indices[keep], rows[keep]
        self.embeddings[:, indices] = rows.transpose(0, 1)
        self.filled[indices] = True


def _nearest_centroid(x: Tensor, centroids: Tensor, chunk_size: int) -> Tensor:
    """argmax_k <x_i, c_k>, in chunks to bound memory for large banks."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.cat([(part @ centroids.T).argmax(dim=1) for part in x.split(chunk_size)])


def _rows_at_global_positions(x: Tensor, positions: Tensor, rank_offset: int, distributed: bool) -> Tensor:
    """Rows of the (virtually concatenated over ranks) matrix at ``positions``, on every rank."""
    local = positions.to(x.device) - rank_offset
    mine = (local >= 0) & (local < x.shape[0])
    rows = x.new_zeros((positions.numel(), x.shape[1]))
    rows[mine] = x[local[mine]]
    return all_reduce_(rows, "sum", distributed)


def _kmeans_plus_plus(
    x: Tensor,
    num_clusters: int,
    generator: torch.Generator,
    rank: int,
    rank_offset: int,
    total: int,
    distributed: bool,
) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) with cosine distance 1 - <x, c>.

    Every draw uses the shared generator and the per-rank weight totals, so all ranks pick the same
    rows as a single process on the concatenated data would.
    """
    first = torch.randint(total, (1,), generator=generator)
    centroids = x.new_zeros((num_clusters, x.shape[1]))
    centroids[0] = _rows_at_global_positions(x, first, rank_offset, distributed)[0]
    best_similarity = x @ centroids[0]
    for j in range(1, num_clusters):
        weights = (1.0 - best_similarity).clamp_min(0.0).double()
        rank_totals = all_gather_cat(weights.sum().reshape(1), distributed).cpu()
        boundaries = torch.cat([rank_totals.new_zeros(1), rank_totals.cumsum(0)])
        draw = float(torch.rand(1, generator=generator, dtype=torch.float64)) * float(boundaries[-1])
        if float(boundaries[-1]) <= 0.0:
            # Every sample coincides with a centroid already: any sample is as good as another.
            position = torch.randint(total, (1,), generator=generator)
        else:
            owner = min(
                int(
                    torch.searchsorted(boundaries[1:], torch.tensor([draw], dtype=torch.float64), right=True)
                ),
                len(rank_totals) - 1,
            )
            position = torch.full((1,), -1, dtype=torch.long, device=x.device)
            if owner == rank:
                cumulative = weights.cumsum(0)
                target = torch.tensor([draw - float(boundaries[owner])], dtype=torch.float64, device=x.device)
                local = torch.searchsorted(cumulative, target, right=True)
                position = local.clamp_max(cumulative.numel() - 1) + rank_offset
            position = all_reduce_(position, "max", distributed).cpu()
        centroids[j] = _rows_at_global_positions(x, position, rank_offset, distributed)[0]
        best_similarity = torch.maximum(best_similarity, x @ centroids[j])
    return centroids


@torch.no_grad()
def spherical_kmeans(
    x: Tensor,
    num_clusters: int,
    iterations: int = 10,
    seed: int = 0,
    generator: torch.Generator | None = None,
    distributed: bool | None = None,
    init: str = "k-means++",
    chunk_size: int = 65536,
) -> tuple[Tensor, Tensor]:
    """Cosine k-means on the unit sphere (DeepCluster-v2, Caron et al. 2020).

    Centroids start at ``num_clusters`` samples (k-means++ seeding, or distinct random samples as in
    DeepCluster-v2); each iteration assigns every sample to its most similar centroid and sets each
    centroid to the normalised mean of its members. A cluster that ends up empty is re-seeded at a
    random sample.

    Args:
        x: (N, D) embeddings; rows are L2-normalised here.
        num_clusters: K.
        iterations: number of assignment + update rounds (DeepCluster-v2 uses 10).
        seed: seeds a CPU generator when ``generator`` is not given.
        generator: CPU ``torch.Generator`` for the initial and re-seeded centroids.
        distributed: ``None`` = auto. Each rank passes its own rows; centroid sums and counts are
            all-reduced and random picks are drawn from the concatenation in rank order, so the
            result equals the single-process run on the concatenated rows. All ranks must use the
            same seed/generator state.
        init: "k-means++" (default; recovers separated clusters far more reliably) or "random"
            (DeepCluster-v2's seeding).
        chunk_size: rows per similarity block (bounds memory for large N and K).

    Returns:
        centroids (K, D), unit rows, identical on all ranks; and assignments (N,) for the local rows.
    """
    if x.dim() != 2:
        raise ValueError(f"spherical_kmeans expects (samples, dim) embeddings, got shape {tuple(x.shape)}.")
    if num_clusters < 1 or iterations < 0:
        raise ValueError(f"need num_clusters >= 1 and iterations >= 0, got {num_clusters} and {iterations}.")
    if init not in ("k-means++", "random"):
        raise ValueError(f"spherical_kmeans init must be 'k-means++' or 'random', got {init!r}.")
    distributed = use_distributed(distributed)
    _, rank = world_size_and_rank(distributed)
    sizes = rank_sizes(x.shape[0], x.device, distributed)
    total, rank_offset = sum(sizes), sum(sizes[:rank])
    if total < num_clusters:
        raise ValueError(
            f"spherical_kmeans got {total} samples for {num_clusters} clusters; lower the number of "
            "clusters or collect more samples (e.g. fill the memory bank for a full epoch first)."
        )
    if generator is None:
        generator = torch.Generator().manual_seed(seed)

    x = F.normalize(x.float() if x.dtype != torch.float64 else x, dim=1)
    if init == "random":
        initial = torch.randperm(total, generator=generator)[:num_clusters]
        centroids = _rows_at_global_positions(x, initial, rank_offset, distributed)
    else:
        centroids = _kmeans_plus_plus(x, num_clusters, generator, rank, rank_offset, total, distributed)
    for _ in range(iterations):
        assignments = _nearest_centroid(x, centroids, chunk_size)
        sums = x.new_zeros(centroids.shape).index_add_(0, assignments, x)
        counts = torch.bincount(assignments, minlength=num_clusters).to(x.dtype)
        all_reduce_(sums, "sum", distributed)
        all_reduce_(counts, "sum", distributed)
        empty = counts == 0
        centroids = F.normalize(sums, dim=1)
        num_empty = int(empty.sum())
        if num_empty:
            reseeds = torch.randint(total, (num_empty,), generator=generator)
            centroids[empty] = _rows_at_global_positions(x, reseeds, rank_offset, distributed)
    return centroids, _nearest_centroid(x, centroids, chunk_size)


def normalized_mutual_information(a: Tensor, b: Tensor) -> float:
    """NMI (arithmetic normalisation, as scikit-learn's default) of two labelings of the same samples.

    1 = the same partition up to a renaming of the clusters, 0 = independent; DeepCluster logs it between
    the assignments of consecutive epochs. Two single-cluster labelings give 1.
    """
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(
            f"need two labelings of the same samples, got shapes {tuple(a.shape)} and {tuple(b.shape)}."
        )
    if a.numel() == 0:
        return float("nan")
    _, a = torch.unique(a.long(), return_inverse=True)
    _, b = torch.unique(b.long(), return_inverse=True)
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    joint = torch.bincount(a * kb + b, minlength=ka * kb).double().view(ka, kb) / a.numel()
    pa, pb = joint.sum(1), joint.sum(0)
    nonzero = joint > 0
    mutual = float((joint[nonzero] * (joint[nonzero] / (pa[:, None] * pb[None, :])[nonzero]).log()).sum())
    entropy_a = float(-(pa * pa.log()).sum())
    entropy_b = float(-(pb * pb.log()).sum())
    if entropy_a + entropy_b <= 0:
        return 1.0
    return max(0.0, min(1.0, 2.0 * mutual / (entropy_a + entropy_b)))


class CentroidScores:
    """Scores ``z C_h^T`` against the centroids of one head, shaped like SwAV's ``Prototypes``: ``weight``
    is the (K, D) centroid matrix and calling it with L2-normalised (B, D) embeddings gives (B, K) scores.
    Lets read-outs written for SwAV prototypes (usage entropy, nearest prototype) run on DeepCluster-v2."""

    def __init__(self, loss: DeepClusterV2Loss, head: int = 0) -> None:
        self._loss = loss
        self._head = head

    @property
    def weight(self) -> Tensor:
        return self._loss.centroids(self._head)

    def __call__(self, z: Tensor, frozen: bool = False) -> Tensor:
        return F.linear(z, self.weight.to(device=z.device, dtype=z.dtype))


class DeepClusterV2Loss(nn.Module):
    """DeepCluster-v2 loss with several k-means heads over a :class:`MemoryBank`.

    Call :meth:`recompute_assignments` once per epoch (after the bank saw the epoch's samples);
    ``forward(embeddings, indices)`` then returns the mean over heads h and views v of
    CE(softmax(C_h z_v / tau), label_h[index]). Head h clusters bank view ``h % num_views``
    (as in DeepCluster-v2). Samples without a label yet (not in the bank at the last recompute)
    are ignored; before the first recompute the loss is 0 (still connected to the graph).
    Centroids and labels are buffers, so they are checkpointed with the module.
    """

    assignments: Tensor
    num_recomputes: Tensor

    def __init__(
        self,
        dim: int,
        num_clusters: Sequence[int],
        memory_size: int,
        temperature: float = 0.1,
        kmeans_iterations: int = 10,
        seed: int = 0,
        kmeans_init: str = "k-means++",
        distributed: bool | None = None,
    ) -> None:
        super().__init__()
        if len(num_clusters) == 0 or any(k < 1 for k in num_clusters):
            raise ValueError(
                "num_clusters must list one positive K per head (e.g. (3000, 3000, 3000)), "
                f"got {num_clusters}."
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (DeepCluster-v2 uses 0.1), got {temperature}.")
        if memory_size < 1:
            raise ValueError(f"memory_size must be the memory bank size (>= 1), got {memory_size}.")
        self.dim = dim
        self.num_clusters = tuple(int(k) for k in num_clusters)
        self.memory_size = memory_size
        self.temperature = temperature
        self.kmeans_iterations = kmeans_iterations
        self.seed = seed
        self.kmeans_init = kmeans_init
        self.distributed = distributed
        for head, k in enumerate(self.num_clusters):
            self.register_buffer(f"centroids_{head}", torch.zeros(k, dim))
        self.register_buffer(
            "assignments", torch.full((len(self.num_clusters), memory_size), -1, dtype=torch.long)
        )
        self.register_buffer("num_recomputes", torch.zeros((), dtype=torch.long))

    def centroids(self, head: int) -> Tensor:
        return getattr(self, f"centroids_{head}")

    @property
    def prototypes(self) -> CentroidScores:
        """Head 0's centroids in the role of SwAV's prototypes (diagnostics: nearest centroid, usage)."""
        return CentroidScores(self, 0)

    @property
    def has_assignments(self) -> bool:
        return int(self.num_recomputes) > 0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # like MemoryBank: a loss built without knowing the dataset takes the memory size it loads
        incoming = state_dict.get(prefix + "assignments")
        heads = len(self.num_clusters)
        if (isinstance(incoming, Tensor) and incoming.dim() == 2 and incoming.shape[0] == heads
                and incoming.shape[1] != self.memory_size):
            self.memory_size = int(incoming.shape[1])
            self.assignments = self.assignments.new_full((heads, self.memory_size), -1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @torch.no_grad()
    def recompute_assignments(self, memory_bank: MemoryBank) -> None:
        """Run spherical k-means per head on the bank's filled entries and store the pseudo-labels.

        Distributed: the filled entries are split into contiguous shards across ranks, k-means runs
        distributed, and labels are all-reduced, so every rank ends with the single-process result.
        Seeds derive from ``seed``, the head and the number of previous recomputes (resumable).
        """
        if memory_bank.size != self.memory_size or memory_bank.dim != self.dim:
            raise ValueError(
                f"memory bank of size {memory_bank.size} and dim {memory_bank.dim} does not match this loss "
                f"(memory_size={self.memory_size}, dim={self.dim})."
            )
        distributed = use_distributed(self.distributed)
        world_size, rank = world_size_and_rank(distributed)
        filled = memory_bank.filled.nonzero().squeeze(1)
        local = filled.tensor_split(world_size)[rank]
        round_seed = int(self.seed) * 1_000_003 + int(self.num_recomputes) * 1_009
        for head, k in enumerate(self.num_clusters):
            view = head % memory_bank.num_views
            centroids, labels = spherical_kmeans(
                memory_bank.embeddings[view, local],
                k,
                self.kmeans_iterations,
                seed=round_seed + head,
                distributed=distributed,
                init=self.kmeans_init,
            )
            self.centroids(head).copy_(centroids)
            head_labels = torch.full_like(self.assignments[head], -1)
            head_labels[local] = labels.to(head_labels.device)
            self.assignments[head] = all_reduce_(head_labels, "max", distributed)
        self.num_recomputes += 1

    def forward(self, embeddings: Sequence[Tensor], indices: Tensor) -> Tensor:
        """Mean over heads and views of the cross-entropy to the samples' pseudo-labels.

        ``embeddings``: per view a (B, D) L2-normalised embedding of the same B samples; ``indices``
        (B,) their global sample indices.
        """
        if len(embeddings) == 0:
            raise ValueError("DeepClusterV2Loss needs at least one view of embeddings.")
        batch = indices.shape[0]
        if any(z.dim() != 2 or z.shape != (batch, self.dim) for z in embeddings):
            raise ValueError(
                f"DeepClusterV2Loss expects per view ({batch}, {self.dim}) embeddings, got "
                f"{[tuple(z.shape) for z in embeddings]}."
            )
        indices = indices.long().to(self.assignments.device)
        labels = self.assignments[:, indices]  # (H, B)
        valid = labels[0] >= 0
        if not bool(valid.any()):
            return sum(z.sum() for z in embeddings) * 0.0 + 0.0  # +0.0: never a printed -0.0
        total = embeddings[0].new_zeros((), dtype=torch.float32)
        for head in range(len(self.num_clusters)):
            centroids = self.centroids(head)
            head_labels = labels[head].to(embeddings[0].device)
            for z in embeddings:
                logits = F.linear(z.float(), centroids.to(z.device)) / self.temperature
                total = total + F.cross_entropy(logits, head_labels, ignore_index=-1)
        return total / (len(self.num_clusters) * len(embeddings))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_clusters={self.num_clusters}, memory_size={self.memory_size}, "
            f"temperature={self.temperature}, kmeans_iterations={self.kmeans_iterations}"
        )
