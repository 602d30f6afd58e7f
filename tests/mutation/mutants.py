"""The hand-written mutants of the mutation check (tests/mutation/run_mutants.py).

Each mutant is one realistic bug: an exact string ``old`` that occurs exactly once in ``path`` (relative to
the repository root) replaced by ``new``, and the pytest arguments (``tests``: paths, node ids, ``-k``
expressions, run from the repository root of the copy) that must fail once it is applied. A mutant the
named tests do not kill is a test that cannot see that bug: strengthen the tests (or, for an equivalent
mutant, say why in ``why`` and remove it).

Adding an op (docs/design.md "How to add an op"): append mutants for its torch backend, its Triton kernels
(they run under the interpreter here), its reference function and its module, each with the by-op test
file (tests/test_<op>.py) and a ``-k`` that selects the backend, e.g. ``-k "torch"`` or ``-k "triton"``.
Keep the selection small: every mutant pays a pytest start-up (~5 s) plus its tests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str = ""


INFO = "tests/test_info_nce.py"
MOM = "tests/test_momentum.py"
QUEUE = "tests/test_queue.py"
CONTRAST = "tests/test_contrast.py"
BANK = "tests/test_memory_bank.py"

MUTANTS: list[Mutant] = [
    # ---------------------------------------------------------------- issue 14: the five survivors
    Mutant(
        "torch-rank-counts-ties",
        "moco_fast/torch_backend/infonce.py",
        "rank += (scores > pos[:, None]).sum(dim=1)",
        "rank += (scores >= pos[:, None]).sum(dim=1)",
        (INFO, "-k", "exact_ties and torch"),
        "issue 14 #1: a negative equal to the positive must not count",
    ),
    Mutant(
        "torch-momentum-chunk-boundary-twice",
        "moco_fast/torch_backend/momentum.py",
        "begin, size = i + 1, 0",
        "begin, size = i, 0",
        (MOM, "-k", "chunk_boundaries"),
        "issue 14 #2: the tensor that ends a chunk is updated again by the next one",
    ),
    Mutant(
        "triton-flat-span-same-storage-only",
        "kernels/momentum.py",
        "if t.untyped_storage().data_ptr() != storage or t.data_ptr() != addr + total * es:",
        "if t.untyped_storage().data_ptr() != storage:",
        (MOM, "-k", "not_one_span and triton"),
        "issue 14 #3: views of one buffer with gaps are not one flat span",
    ),
    Mutant(
        "head-symmetric-lse-repeats-first-direction",
        "moco_fast/head.py",
        "torch.cat([s12.lse, s21.lse])",
        "torch.cat([s12.lse, s12.lse])",
        ("tests/test_head.py", "-k", "symmetric"),
        "issue 14 #4: stats.lse row by row, in order",
    ),
    Mutant(
        "builder-bn-splits-permutes-twice",
        "moco_fast/builder.py",
        "return k[torch.argsort(perm)]",
        "return k[perm]",
        ("tests/test_builder.py", "-k", "bn_splits"),
        "issue 14 #5: un-permuting needs the inverse permutation",
    ),
    # ---------------------------------------------------------------- torch backend: InfoNCE
    Mutant(
        "torch-rescale-inverted",
        "moco_fast/torch_backend/infonce.py",
        "correction = torch.exp(row_max - new_max)",
        "correction = torch.exp(new_max - row_max)",
        (INFO, "-k", "matches_float64_large and torch"),
    ),
    Mutant(
        "torch-accumulator-not-rescaled",
        "moco_fast/torch_backend/infonce.py",
        "acc.mul_(correction[:, None]).addmm_(probs, keys)",
        "acc.addmm_(probs, keys)",
        (INFO, "-k", "matches_float64_large and torch"),
    ),
    Mutant(
        "torch-dk-sign",
        "moco_fast/torch_backend/infonce.py",
        "dk = (g * torch.expm1(-loss.to(ct)))[:, None] * q.to(ct)",
        "dk = (g * -torch.expm1(-loss.to(ct)))[:, None] * q.to(ct)",
        (INFO, "-k", "small_grid and torch"),
    ),
    Mutant(
        "torch-dn-without-temperature",
        "moco_fast/torch_backend/infonce.py",
        "probs = (qs @ keys.T).sub_(lse[:, None]).exp_()",
        "probs = (qf @ keys.T).sub_(lse[:, None]).exp_()",
        (INFO, "-k", "negatives_gradient and torch"),
    ),
    Mutant(
        "torch-fused-path-drops-the-positive",
        "moco_fast/torch_backend/infonce.py",
        "delta = out_neg.sub_(k).mul_(torch.sigmoid(a)[:, None])",
        "delta = out_neg.sub_(k)",
        ("tests/test_torch_internals.py", "-k", "fused"),
    ),
    # ---------------------------------------------------------------- torch backend: enqueue, momentum
    Mutant(
        "torch-enqueue-count-unsaturated",
        "moco_fast/torch_backend/enqueue.py",
        "count.fill_(min(count.item() + batch, size))",
        "count.fill_(count.item() + batch)",
        (QUEUE, "-k", "wrap_around_matches"),
    ),
    Mutant(
        "torch-enqueue-device-ptr-no-wrap",
        "moco_fast/torch_backend/enqueue.py",
        "ptr.copy_((ptr + step) % size)",
        "ptr.copy_(ptr + step)",
        ("tests/test_torch_internals.py", "-k", "enqueue_paths"),
    ),
    Mutant(
        "torch-enqueue-accepts-inf",
        "moco_fast/torch_backend/enqueue.py",
        "return math.isfinite(x.sum().item()) or bool(x.abs().amax() < math.inf)",
        "return not math.isnan(x.sum().item())",
        (QUEUE, "-k", "non_finite and not triton and not reference"),
    ),
    Mutant(
        "torch-enqueue-ignores-normalize",
        "moco_fast/torch_backend/enqueue.py",
        "new = torch.nn.functional.normalize(keys.float(), dim=1) if normalize else keys",
        "new = keys",
        (QUEUE, "-k", "normalize and not triton and not reference"),
    ),
    Mutant(
        "torch-momentum-lerp-weight",
        "moco_fast/torch_backend/momentum.py",
        "torch._foreach_lerp_(targets, sources, 1.0 - momentum)",
        "torch._foreach_lerp_(targets, sources, momentum)",
        (MOM, "-k", "default_update_is_one_lerp"),
    ),
    Mutant(
        "torch-momentum-exact-weight",
        "moco_fast/torch_backend/momentum.py",
        "scaled = torch._foreach_mul(src, 1.0 - momentum)",
        "scaled = torch._foreach_mul(src, momentum)",
        (MOM, "-k", "official_loop"),
    ),
    # ---------------------------------------------------------------- reference backend
    Mutant(
        "reference-rank-counts-ties",
        "moco_fast/reference.py",
        "\n    rank = (logits[:, 1:] > logits[:, :1]).sum(dim=1)\n    return loss, torch.logsumexp",
        "\n    rank = (logits[:, 1:] >= logits[:, :1]).sum(dim=1)\n    return loss, torch.logsumexp",
        (INFO, "-k", "exact_ties and reference"),
    ),
    Mutant(
        "reference-enqueue-no-wrap",
        "moco_fast/reference.py",
        "queue[(start + i) % size] = rows[i]",
        "queue[min(start + i, size - 1)] = rows[i]",
        (QUEUE, "-k", "contract_enqueue and reference"),
    ),
    # ---------------------------------------------------------------- Triton kernels (interpreter)
    Mutant(
        "triton-rank-counts-ties",
        "kernels/infonce_fwd.py",
        "beats = s > pos[:, None]",
        "beats = s >= pos[:, None]",
        (INFO, "-k", "exact_ties and triton"),
    ),
    Mutant(
        "triton-rank-counts-padded-keys",
        "kernels/infonce_fwd.py",
        "beats = beats & key_ok[None, :]",
        "beats = beats",
        (INFO, "-k", "contract_forward_matches and triton"),
    ),
    Mutant(
        "triton-combine-sum-not-rescaled",
        "kernels/infonce_combine.py",
        "l_all += tl.load(l_ptr + sm_off, mask=sm_mask, other=0.0) * w",
        "l_all += tl.load(l_ptr + sm_off, mask=sm_mask, other=0.0)",
        (INFO, "-k", "contract_forward_matches and triton"),
    ),
    Mutant(
        "triton-dk-sign",
        "kernels/infonce_bwd.py",
        "dk = (gs * expm1(-loss))[:, None] * q",
        "dk = (gs * -expm1(-loss))[:, None] * q",
        (INFO, "-k", "contract_backward_matches and triton"),
    ),
    Mutant(
        "triton-dn-lse-in-the-wrong-log-base",
        "kernels/infonce_bwd.py",
        "lse2 = tl.load(lse_ptr + i + r, mask=row_ok, other=0.0) * LOG2E",
        "lse2 = tl.load(lse_ptr + i + r, mask=row_ok, other=0.0)",
        (INFO, "-k", "contract_backward_matches and triton"),
    ),
    Mutant(
        "triton-momentum-tail-one-past",
        "kernels/momentum.py",
        "_lerp(t_base + tail, s_base + tail, w, tail < n, True)",
        "_lerp(t_base + tail, s_base + tail, w, tail <= n, True)",
        (MOM, "-k", "misaligned_views and triton"),
        "writes one element past each view (inside the test's buffers)",
    ),
    Mutant(
        "triton-chunk-table-cache-ignores-sizes",
        "kernels/momentum.py",
        "key = (str(dev), targets[0].dtype, t_ptrs, s_ptrs, sizes)",
        "key = (str(dev), targets[0].dtype, t_ptrs, s_ptrs)",
        (MOM, "-k", "same_addresses_other_lengths and triton"),
        "a cached chunk table reused for the same addresses with other lengths",
    ),
    Mutant(
        "triton-enqueue-count-unsaturated",
        "kernels/enqueue.py",
        "tl.store(count_ptr, tl.minimum(count + B, K))",
        "tl.store(count_ptr, count + B)",
        (QUEUE, "-k", "contract_enqueue and triton"),
    ),
    Mutant(
        "triton-enqueue-accepts-inf",
        "kernels/enqueue.py",
        'bad += tl.sum(tl.where(tl.abs(x) < float("inf"), 0, 1), axis=1)',
        "bad += tl.sum(tl.where(x == x, 0, 1), axis=1)",
        (QUEUE, "-k", "non_finite and triton"),
    ),
    # ---------------------------------------------------------------- KeyQueue
    Mutant(
        "queue-fill-mirror-unsaturated",
        "moco_fast/queue.py",
        "self._filled = min(self._filled + batch, self.size)",
        "self._filled = self._filled + batch",
        (QUEUE, "-k", "wrap_around_matches"),
    ),
    Mutant(
        "queue-load-keeps-stale-fill-count",
        "moco_fast/queue.py",
        "super()._load_from_state_dict(*args, **kwargs)\n        self._forget_device_state()",
        "super()._load_from_state_dict(*args, **kwargs)",
        (QUEUE, "-k", "load_state_dict"),
    ),
    Mutant(
        "queue-skip-not-counted",
        "moco_fast/queue.py",
        "            self.num_skipped += 1",
        "            pass",
        (QUEUE, "-k", "skip"),
    ),
    Mutant(
        "queue-batch-check-off-by-one",
        "moco_fast/queue.py",
        "if batch > self.size:",
        "if batch > self.size + 1:",
        (QUEUE, "-k", "batch_larger"),
    ),
    Mutant(
        "queue-refusal-raised-again",
        "moco_fast/queue.py",
        "if landed is not None and landed > self._refusals_seen:",
        "if landed is not None and landed >= self._refusals_seen:",
        ("tests/test_sync_free.py",),
    ),
    # ---------------------------------------------------------------- MoCoHead
    Mutant(
        "head-symmetric-wrong-pair",
        "moco_fast/head.py",
        "loss12, s12 = self._pair(q1, k2, negatives)",
        "loss12, s12 = self._pair(q1, k1, negatives)",
        ("tests/test_head.py", "-k", "symmetric"),
    ),
    Mutant(
        "head-symmetric-enqueue-order",
        "moco_fast/head.py",
        "new_keys = [k1.detach(), k2.detach()]",
        "new_keys = [k2.detach(), k1.detach()]",
        ("tests/test_head.py", "-k", "symmetric_loss_is_the_average"),
    ),
    Mutant(
        "head-accumulate-interleaves-slots",
        "moco_fast/head.py",
        "pending = [k for slot in self._pending for k in slot]",
        "pending = [k for ks in zip(*self._pending) for k in ks]",
        ("tests/test_accumulation.py", "-k", "head"),
    ),
    # ---------------------------------------------------------------- MomentumEncoder
    Mutant(
        "encoder-plan-ignores-moved-parameters",
        "moco_fast/momentum.py",
        "if tuple(p.data_ptr() for p in key[2]) == key[3]:",
        "if True:",
        (MOM, "-k", "encoder and plan"),
        "a stale plan after p.data = ... (new storage, no registration)",
    ),
    Mutant(
        "encoder-cosine-not-clamped",
        "moco_fast/momentum.py",
        "t = min(max(step, 0), total_steps)",
        "t = max(step, 0)",
        (MOM, "-k", "cosine"),
    ),
    Mutant(
        "encoder-no-reflatten-after-to",
        "moco_fast/momentum.py",
        "self._flatten()  # .to()/.cuda()/.half() give the parameters new storage: flatten it again",
        "pass",
        (MOM, "-k", "flat_buffer_survives"),
    ),
    # ---------------------------------------------------------------- distributed helpers (2 gloo ranks)
    Mutant(
        "ddp-unshuffle-with-the-shuffle",
        "moco_fast/distributed.py",
        "idx_unshuffle = torch.argsort(idx_shuffle)",
        "idx_unshuffle = idx_shuffle",
        ("tests/test_distributed.py",),
    ),
    Mutant(
        "ddp-every-rank-takes-rank-0s-slice",
        "moco_fast/distributed.py",
        "idx_this = idx_shuffle.view(num_ranks, -1)[dist.get_rank()]",
        "idx_this = idx_shuffle.view(num_ranks, -1)[0]",
        ("tests/test_distributed.py",),
    ),
    Mutant(
        "ddp-gather-reversed",
        "moco_fast/distributed.py",
        "    dist.all_gather(gathered, tensor)\n    return torch.cat(gathered, dim=0)",
        "    dist.all_gather(gathered, tensor)\n    return torch.cat(gathered[::-1], dim=0)",
        ("tests/test_distributed.py",),
    ),
    # ---------------------------------------------------------------- MoCo builder
    Mutant(
        "builder-accumulate-updates-every-forward",
        "moco_fast/builder.py",
        "                self._updates_left -= 1",
        "                pass",
        ("tests/test_accumulation.py", "-k", "moco"),
    ),
    Mutant(
        "builder-mlp-without-relu",
        "moco_fast/builder.py",
        "nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), fc)",
        "nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.Identity(), fc)",
        ("tests/test_builder.py", "-k", "constructor"),
    ),
    # ---------------------------------------------------------------- functional, validation, ops, cuda_ext
    Mutant(
        "functional-acc5-off-by-one",
        "moco_fast/functional.py",
        "acc5=(rank < 5)",
        "acc5=(rank <= 5)",
        (INFO, "-k", "stats_match_topk and torch"),
    ),
    Mutant(
        "validation-temperature-zero-accepted",
        "moco_fast/validation.py",
        "if not math.isfinite(temperature) or temperature <= 0:",
        "if not math.isfinite(temperature) or temperature < 0:",
        ("tests/test_errors.py", "-k", "temperature"),
    ),
    Mutant(
        "ops-saves-negatives-without-grad",
        "moco_fast/ops.py",
        "ctx.save_for_backward(q, k, loss.detach().clone(), delta, lse if need else None, negatives if need else None)",
        "ctx.save_for_backward(q, k, loss.detach().clone(), delta, lse, negatives)",
        (INFO, "-k", "backward_does_not_read_negatives"),
        "the queue could not be overwritten between forward and backward",
    ),
    Mutant(
        "cuda-ext-ignores-fp32-precision",
        "moco_fast/cuda_ext.py",
        "        numerics.fp32_matmul_precision(),",
        '        "ieee",',
        ("tests/test_cuda_ext.py", "-k", "precision"),
    ),
    # ---------------------------------------------------------------- the contrastive core and its losses
    Mutant(
        "torch-contrast-target-in-the-sweep",
        "moco_fast/torch_backend/contrast.py",
        '            _set_where(scores, *_columns(tb, c0, width), float("-inf"))\n',
        "",
        (CONTRAST, "-k", "core_matches_float64 and torch"),
        "the target would be counted twice (in the sweep and merged at the end)",
    ),
    Mutant(
        "torch-contrast-exclusion-ignored",
        "moco_fast/torch_backend/contrast.py",
        '                _set_where(scores, *_columns(eb, c0, width), float("-inf"))',
        "                pass",
        (CONTRAST, "-k", "nt_xent_matches_float64"),
    ),
    Mutant(
        "torch-contrast-fused-path-keeps-cancelling-rows",
        "moco_fast/torch_backend/contrast.py",
        "    if redo.numel():",
        "    if False:",
        ("tests/test_tiny_losses.py", "-k", "contrast_loss_and_dq and fused and fp32"),
        "issue 13: lse − pos over all keys cancels when the target dominates",
    ),
    Mutant(
        "torch-contrast-keys-grad-without-target-indicator",
        "moco_fast/torch_backend/contrast.py",
        "            _set_where(probs, *_columns(target[r0:r1], c0, width), target_term[r0:r1])  # P − onehot(target)",
        "            pass",
        (CONTRAST, "-k", "nt_xent_matches_float64"),
    ),
    Mutant(
        "triton-contrast-target-in-the-sweep",
        "kernels/contrast_fwd.py",
        "        valid = key_ok[None, :] & (key[None, :] != tgt[:, None])  # the target joins at the end",
        "        valid = key_ok[None, :]",
        (CONTRAST, "-k", "triton_core_matches_float64"),
    ),
    Mutant(
        "triton-contrast-bwd-without-target-indicator",
        "kernels/contrast_bwd.py",
        "        pt = pt - (key[:, None] == tgt[None, :]).to(tl.float32)  # in [-1, 1]: safe to round to half",
        "        pt = pt",
        (CONTRAST, "-k", "triton_nt_xent_matches_float64"),
    ),
    Mutant(
        "nt-xent-positive-off-by-one",
        "moco_fast/functional.py",
        "    target = offset + (local + rows // 2) % rows",
        "    target = offset + (local + rows // 2 + 1) % rows",
        (CONTRAST, "-k", "nt_xent_equals_simclr_reference_and_lightly"),
    ),
    Mutant(
        "mocov3-loss-without-2T",
        "moco_fast/functional.py",
        "    loss = loss.mean() * (2.0 * temperature)",
        "    loss = loss.mean()",
        (CONTRAST, "-k", "mocov3_loss_matches_official"),
    ),
    Mutant(
        "gather-with-grad-not-summed",
        "moco_fast/distributed.py",
        "        dist.all_reduce(grad)  # gloo has no reduce_scatter; the sum of the whole (W·B, d) is small\n",
        "",
        ("tests/test_dicts_distributed.py", "-k", "two_ranks_equal_one_process"),
        "the peers' bug (lightly#1528, vissl #123): each rank keeps only its own gradient of its rows",
    ),
    Mutant(
        "ntxent-bank-enqueued-without-grad-check",
        "moco_fast/losses.py",
        "        if out0.requires_grad:  # lightly updates only when a backward pass will follow",
        "        if True:",
        ("tests/test_ntxent_loss.py", "-k", "bank_is_not_updated_without_grad"),
    ),
    # ---------------------------------------------------------------- the memory bank
    Mutant(
        "torch-bank-first-occurrence-wins",
        "moco_fast/torch_backend/memory_bank.py",
        "    src[perm] = perm[group_end]",
        "    src[perm] = perm",
        (BANK, "-k", "duplicate or npid or last_occurrence"),
        "on the CPU index_copy_ writes duplicates in order (the last wins either way); on a GPU the order is "
        "undefined, so every duplicate must write the same row: the helper's own test sees it",
    ),
    Mutant(
        "triton-bank-not-renormalized",
        "kernels/memory_bank.py",
        "    u = u / tl.maximum(norm, 1e-12)[:, None]",
        "    u = u",
        (BANK, "-k", "triton or npid"),
    ),
    # ---------------------------------------------------------------- BYOL / SwAV / DINO
    Mutant(
        "sinkhorn-no-prototype-normalization",
        "moco_fast/swav.py",
        "        L -= _global_lse(L, 0, world, buf).add_(log_p)  # each prototype's mass → 1/P (all ranks)\n",
        "",
        ("tests/test_swav.py", "-k", "sinkhorn_matches_lightly or fixed_point"),
    ),
    Mutant(
        "triton-dino-center-sign",
        "kernels/dino_fwd.py",
        "            s -= b[None, :] * qk_scale",
        "            s += b[None, :] * qk_scale",
        ("tests/test_dino.py", "-k", "triton"),
    ),
    Mutant(
        "dino-student-grad-keeps-own-teacher-view",
        "moco_fast/ops.py",
        "        partners[: min(S, T)] -= uv[: min(S, T)]",
        "        pass",
        ("tests/test_dino.py", "-k", "float64 or lightly"),
        "a student view must not be paired with its own teacher view",
    ),
    Mutant(
        "dino-center-momentum-swapped",
        "moco_fast/dino.py",
        "self.center * m + batch_center.reshape(self.center.shape).to(self.center.dtype) * (1 - m)",
        "self.center * (1 - m) + batch_center.reshape(self.center.shape).to(self.center.dtype) * m",
        ("tests/test_dino.py", "-k", "lightly"),
    ),
]
