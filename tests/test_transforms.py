"""Tier 2: normalisation and training-split augmentation on tensors, drawn from the task generator."""

import pytest
import torch

from metarun.data.transforms import AUGMENTS, Augment, normalize, pad_crop, resized_crop

from test_store import Tiny, root, tasks  # noqa: F401  (the tiny colour dataset and its fixture)


def batch(seed=0, shape=(2, 3, 4), c=3, size=8):
    return torch.rand(*shape, c, size, size, generator=torch.Generator().manual_seed(seed))


def test_normalize_is_per_channel_and_none_leaves_the_images():
    x = batch()
    assert normalize(x, None, None) is x
    y = normalize(x, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    torch.testing.assert_close(y[..., 2, :, :], (x[..., 2, :, :] - 0.3) / 0.5)


@pytest.mark.parametrize("names", [("flip",), ("pad_crop",), ("resized_crop",), ("jitter",), ("pad_crop", "flip", "jitter")])
def test_augmentations_keep_shape_range_and_follow_the_generator(names):
    aug, x = Augment(names), batch()
    p1 = aug.draw(x.shape[:3], torch.Generator().manual_seed(3))
    p2 = aug.draw(x.shape[:3], torch.Generator().manual_seed(3))
    p3 = aug.draw(x.shape[:3], torch.Generator().manual_seed(4))
    y1, y2, y3 = aug.apply(x, p1), aug.apply(x, p2), aug.apply(x, p3)
    assert y1.shape == x.shape and y1.min() >= 0 and y1.max() <= 1
    assert torch.equal(y1, y2) and not torch.equal(y1, y3) and not torch.equal(y1, x)
    assert all(p.shape[:3] == x.shape[:3] for p in p1)  # one draw per image, tasks leading


def test_flip_and_pad_crop_move_pixels_exactly():
    x = batch(shape=(1, 1, 2))
    flip = Augment(("flip",))
    y = flip.apply(x, (torch.tensor([True, False]).view(1, 1, 2),))
    assert torch.equal(y[0, 0, 0], x[0, 0, 0].flip(-1)) and torch.equal(y[0, 0, 1], x[0, 0, 1])
    flat = x.reshape(-1, 3, 8, 8)
    centred = pad_crop(flat, torch.tensor([[4, 4], [4, 4]]))
    assert torch.equal(centred, flat)  # offset (4, 4) of a pad of 4: the image itself
    shifted = pad_crop(flat, torch.tensor([[0, 4], [8, 8]]))  # (dx, dy)
    assert torch.equal(shifted[0, :, :, 4:], flat[0, :, :, :4]) and shifted[0, :, :, :4].eq(0).all()
    assert torch.equal(shifted[1, :, :4, :4], flat[1, :, 4:, 4:]) and shifted[1, :, 4:].eq(0).all()
    whole = resized_crop(flat, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2))
    torch.testing.assert_close(whole, flat)  # the full box resized to itself


def test_unknown_or_conflicting_augmentations_are_refused():
    with pytest.raises(ValueError, match="augment takes"):
        Augment(("cutout",))
    with pytest.raises(ValueError, match="not both"):
        Augment(("resized_crop", "pad_crop"))
    assert Augment(reversed(AUGMENTS[2:])).names == ("flip", "jitter")  # a fixed order, whatever the list's


def test_augmentation_applies_to_training_tasks_only(root):  # noqa: F811
    plain, augmented = tasks(root), tasks(root, augment=("pad_crop", "flip", "jitter"))
    for split in ("val", "test"):  # evaluation never augments: the same tasks, the same images
        a = list(plain.fixed_episodes(split, 4, 4, 0))[0]
        b = list(augmented.fixed_episodes(split, 4, 4, 0))[0]
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    a = plain.sample("train", 4, torch.Generator().manual_seed(0))
    b = augmented.sample("train", 4, torch.Generator().manual_seed(0))
    assert torch.equal(a.classes, b.classes) and not torch.equal(a.support_x, b.support_x)
    again = augmented.sample("train", 4, torch.Generator().manual_seed(0))
    assert torch.equal(b.support_x, again.support_x)  # the augmentation replays with the task stream
    assert "augment" in augmented.summary() and "augment" not in plain.summary()


def test_augmented_memmap_and_device_stores_agree(root):  # noqa: F811
    names = ("resized_crop", "flip", "jitter")
    a = tasks(root, augment=names, residency="device").sample("train", 3, torch.Generator().manual_seed(1))
    b = tasks(root, augment=names, residency="memmap").sample("train", 3, torch.Generator().manual_seed(1))
    assert torch.equal(a.support_x, b.support_x)
