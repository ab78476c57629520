"""The storage tracker of ``plan --measure`` against known answers and torch's own MemTracker."""

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from repo_megatron.plan.tracker import BACKWARD, StorageTracker

META = torch.device("meta")


def test_views_of_one_storage_count_once_and_freeing_leaves_the_count():
    with StorageTracker(META) as tracker:
        x = torch.empty(1024, 256, device=META)                    # 1 MiB of fp32
        views = [x[:10], x.t(), x.view(-1), x[::2]]
        assert tracker.current == 1024 * 256 * 4
        y = x + 1                                                  # a new storage
        assert tracker.current == 2 * 1024 * 256 * 4
        del x, views
        assert tracker.current == 1024 * 256 * 4                  # y alone
        del y
        assert tracker.current == 0
    assert tracker.peak.bytes == 2 * 1024 * 256 * 4


def test_storages_are_tagged_by_phase_and_by_the_backward_pass():
    with StorageTracker(META) as tracker:
        w = torch.empty(64, 64, device=META, requires_grad=True)
        with tracker.in_phase("forward"):
            out = (w @ w).sum()
        out.backward()                                             # the gradient of w
        assert tracker.by_tag["forward"] > 0
        assert tracker.by_tag[BACKWARD] == w.grad.untyped_storage().nbytes()
        moved = tracker.retag([w.grad, w.grad.view(-1)], "gradients")
        assert moved == 64 * 64 * 4                                # one storage, once
        assert tracker.by_tag[BACKWARD] == 0 and tracker.by_tag["gradients"] == moved


def test_peaks_per_phase_and_reset():
    with StorageTracker(META) as tracker:
        with tracker.in_phase("a"):
            big = torch.empty(1000, device=META)
            del big
        with tracker.in_phase("b"):
            small = torch.empty(10, device=META)
        assert tracker.phase_peaks == {"a": 4000, "b": 40}
        assert tracker.peak.bytes == 4000 and tracker.peak.phase == "a"
        tracker.reset_peaks()
        assert tracker.peak.bytes == 40 and tracker.tag_max["a"] == 0
        del small


def test_storage_resize_is_followed():
    with StorageTracker(META) as tracker:
        x = torch.empty(100, device=META)
        x.untyped_storage().resize_(0)          # what Megatron does to free a buffer in place
        assert tracker.current == 0
        x.untyped_storage().resize_(800)
        assert tracker.current == 800


def test_tensors_made_elsewhere_are_not_counted_but_the_largest_is_reported():
    with StorageTracker(META) as tracker, tracker.in_phase("build"):
        cpu = torch.zeros(1000)
        assert tracker.current == 0
    assert tracker.largest_elsewhere == (4000, "build")
    del cpu


def _training_run():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(),
                                torch.nn.Linear(1024, 256)).to(META)
    return model, torch.optim.AdamW(model.parameters(), foreach=False), \
        torch.empty(64, 256, device=META)


def test_peak_of_two_training_steps_equals_torch_memtracker():
    model, optimizer, x = _training_run()
    reference = MemTracker()
    reference.track_external(model, optimizer, x)
    with reference:
        for _ in range(2):
            model(x).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            reference.reset_mod_stats()
    expected = reference.get_tracker_snapshot("peak")[META]["Total"]

    model, optimizer, x = _training_run()
    tracker = StorageTracker(META)
    with tracker:
        tracker.track([x, *model.parameters()], "external")  # as MemTracker.track_external
        for _ in range(2):
            model(x).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert tracker.peak.bytes == expected
