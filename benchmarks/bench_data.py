"""Episodes per second from metarun's image store (on the device, and read from its file per batch)
against a torchvision ImageFolder + DataLoader pipeline decoding JPEGs, and the peak host memory of a
tieredImageNet-sized file-backed store.

Everything runs on generated data of the real size, made in one run: miniImageNet's 100 classes of
600 images at 3x84x84 (1.27 GB as uint8, smooth random images so the JPEGs have a natural size), the
peers' pipeline over the 64 training classes saved as JPEGs (``ImageFolder``, PIL decoding,
``ToTensor`` + ``Normalize`` in ``--workers`` worker processes, an episode batch sampler), and a
tieredImageNet-sized store (779,165 images, 16.5 GB) as a sparse file, read per batch in a child
process whose peak resident memory is reported. Tasks: 5-way 5-shot, 15 queries, meta-batch 4.

    python benchmarks/bench_data.py [--device auto] [--rounds 5] [--batches 50] [--workers 2] [--work-dir DIR]

The reference row uses torchvision's ImageFolder when torchvision imports (install the build that
matches your torch); otherwise the same steps written out with PIL (``PILFolder``), and says so.
``--size small`` is a quick smoke run.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metarun.data import cache  # noqa: E402
from metarun.data.cache import StoreWriter  # noqa: E402
from metarun.data.images import ImageDataset, ImageTasks  # noqa: E402
from metarun.data.tasks import task_generator  # noqa: E402
from metarun.utils.runtime import resolve_device  # noqa: E402

WAYS, SHOTS, QUERIES, META_BATCH = 5, 5, 15, 4
SIZES = {  # classes per split, images per class, image side
    "real": {"splits": {"train": 64, "val": 16, "test": 20}, "per_class": 600, "side": 84},
    "small": {"splits": {"train": 8, "val": 5, "test": 5}, "per_class": 40, "side": 84},
}
TIERED = {"real": (779_165, 608), "small": (20_000, 100)}  # images, classes (tieredImageNet: 779,165 in 608)
MEAN, STD = (0.4721, 0.4533, 0.4100), (0.2772, 0.2677, 0.2845)


def smooth_images(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    """(n, 3, side, side) uint8: low-frequency colour noise, so a JPEG of one is a few kB like a photo's."""
    coarse = rng.integers(0, 256, size=(n, 3, 6, 6), dtype=np.uint8)
    x = torch.nn.functional.interpolate(torch.from_numpy(coarse).float(), size=(side, side), mode="bicubic",
                                        align_corners=False)
    return x.clamp(0, 255).to(torch.uint8).numpy()


class Synthetic(ImageDataset):
    """A generated dataset of miniImageNet's shape, decoded by writing it."""

    name, title, channels, image_size = "bench-mini", "generated miniImageNet", 3, 84
    mean, std = MEAN, STD
    split_names = ("ravi",)
    size = "real"

    def locate(self, download):
        marker = self.root / "bench-mini.txt"
        marker.write_text(self.size)
        return [marker]

    def layout(self):
        return "generated"

    def decode(self, files, writer):
        spec, rng = SIZES[self.size], np.random.default_rng(0)
        for split, count in spec["splits"].items():
            for c in range(count):
                writer.add_class(f"{split}{c:03d}", smooth_images(rng, spec["per_class"], spec["side"]), split)

    def split_classes(self, store):
        return {s: [i for i, t in enumerate(store.splits_of_class) if t == s] for s in ("train", "val", "test")}


class SyntheticTasks(ImageTasks):
    dataset = Synthetic

    def __init__(self, root: str, residency: str):
        super().__init__(WAYS, SHOTS, QUERIES, root, cache_dir=root, residency=residency)


def time_store(tasks: ImageTasks, device, batches: int, rounds: int) -> float:
    """Median episodes per second of ``sample('train', META_BATCH)`` over ``rounds`` of ``batches``."""
    generator = task_generator("train", 0)
    for _ in range(3):
        tasks.sample("train", META_BATCH, generator)
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(batches):
            episode = tasks.sample("train", META_BATCH, generator)
        episode.query_x.sum().item()  # the last batch is on the device
        rates.append(batches * META_BATCH / (time.perf_counter() - start))
    return statistics.median(rates)


def write_jpegs(tasks: ImageTasks, folder: Path) -> None:
    from PIL import Image

    store = tasks.store
    for i in tasks.split_class_indices["train"].tolist():
        out = folder / store.class_names[i]
        out.mkdir(parents=True, exist_ok=True)
        for j, image in enumerate(store.class_images(i).permute(0, 2, 3, 1).numpy()):
            Image.fromarray(image).save(out / f"{j:04d}.jpg", quality=95)


class EpisodeBatches(torch.utils.data.Sampler):
    """Index batches of META_BATCH tasks of WAYS classes with SHOTS + QUERIES images each (the peers' episodes)."""

    def __init__(self, targets: list[int], batches: int, seed: int = 0):
        self.by_class = {}
        for i, t in enumerate(targets):
            self.by_class.setdefault(t, []).append(i)
        self.classes, self.batches, self.rng = sorted(self.by_class), batches, np.random.default_rng(seed)

    def __len__(self):
        return self.batches

    def __iter__(self):
        for _ in range(self.batches):
            batch = []
            for _ in range(META_BATCH):
                for c in self.rng.choice(self.classes, WAYS, replace=False):
                    batch += self.rng.choice(self.by_class[c], SHOTS + QUERIES, replace=False).tolist()
            yield batch


class PILFolder(torch.utils.data.Dataset):
    """What ``ImageFolder(folder, transform=Compose([ToTensor(), Normalize(MEAN, STD)]))`` does, step for step
    (class folders in sorted order, PIL open + convert("RGB"), HWC uint8 -> CHW float / 255, normalise), for
    machines whose torchvision build does not load against their torch (its C extension is optional for
    this pipeline, but ``import torchvision`` fails without it)."""

    def __init__(self, folder: Path):
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        self.samples = [(str(f), c) for c, name in enumerate(classes) for f in sorted((folder / name).iterdir())]
        self.targets = [c for _, c in self.samples]
        self.mean, self.std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, target = self.samples[i]
        with open(path, "rb") as f:
            image = Image.open(f).convert("RGB")
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255)
        return (x - self.mean) / self.std, target


def image_folder(folder: Path) -> tuple[torch.utils.data.Dataset, str]:
    """torchvision's ImageFolder pipeline where torchvision imports, else its step-for-step equivalent."""
    try:
        from torchvision import datasets, transforms
    except (ImportError, RuntimeError, OSError) as e:  # a CUDA-only torchvision wheel beside a CPU torch
        return PILFolder(folder), f"ImageFolder's steps with PIL (torchvision unusable here: {type(e).__name__})"
    dataset = datasets.ImageFolder(str(folder), transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]))
    return dataset, "torchvision ImageFolder"


def time_image_folder(dataset, device, batches: int, rounds: int, workers: int) -> float:
    # One loader whose workers live across rounds (persistent_workers), as in a training run: worker start-up
    # is not counted; the first round warms the workers and the page cache up.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=EpisodeBatches(dataset.targets, batches),
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    rates = []
    for r in range(rounds + 1):
        start = time.perf_counter()
        for x, _ in loader:
            x = x.to(device, non_blocking=True).view(META_BATCH, WAYS, SHOTS + QUERIES, *x.shape[1:])
        x.sum().item()
        if r:
            rates.append(batches * META_BATCH / (time.perf_counter() - start))
    return statistics.median(rates)


def sparse_store(folder: Path, images: int, classes: int) -> None:
    """A tieredImageNet-sized store folder whose image file is sparse (no 16.5 GB written to disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = [images // classes + (1 if c < images % classes else 0) for c in range(classes)]
    with open(folder / cache.IMAGES_FILE, "wb") as f:
        f.truncate(images * 3 * 84 * 84)
    index = {"format": cache.STORE_FORMAT, "version": cache.STORE_VERSION, "shape": [3, 84, 84], "images": images,
             "class_names": [f"c{c}" for c in range(classes)], "counts": counts,
             "splits": ["train"] * classes, "sha256": "", "meta": {"dataset": "sparse"}}
    (folder / cache.INDEX_FILE).write_text(json.dumps(index))


def peak_rss() -> int:
    """This process's peak resident memory in bytes. VmHWM where Linux has it: ru_maxrss also counts the
    parent's memory at the fork that started this process (Linux keeps it across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


class SparseTiered(ImageDataset):
    """The sparse tieredImageNet-sized store, split into train/val/test classes by position."""

    name, title, channels, image_size = "bench-tiered", "generated tieredImageNet", 3, 84
    mean, std = MEAN, STD
    split_names = ("ren",)

    def split_classes(self, store):
        n = len(store.counts)
        return {"train": list(range(0, n - 2 * (n // 4))), "val": list(range(n - 2 * (n // 4), n - n // 4)),
                "test": list(range(n - n // 4, n))}


class SparseTieredTasks(ImageTasks):
    dataset = SparseTiered
    folder: Path

    def __init__(self, root: str):
        super().__init__(WAYS, SHOTS, QUERIES, root, residency="memmap")

    def load_store(self, download):
        from metarun.data.store import ImageStore

        return ImageStore.open(self.folder)


def tiered_memory_child(folder: Path, device_name: str, batches: int) -> None:
    """Runs in a child process: ``batches`` training batches from the file-backed store as a run draws them
    (ImageTasks: prefetch thread, normalisation), then print the process's peak resident memory."""
    SparseTieredTasks.folder = folder
    tasks = SparseTieredTasks(str(folder)).to(resolve_device(device_name))
    generator = task_generator("train", 0)
    start = time.perf_counter()
    for _ in range(batches):
        episode = tasks.sample("train", META_BATCH, generator)
    episode.query_x.sum().item()
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_bytes": peak_rss(), "store_bytes": tasks.store.nbytes, "batches": batches,
                      "seconds": seconds, "store": tasks.store.describe()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, after a warm-up")
    parser.add_argument("--batches", type=int, default=50, help="meta-batches per timed round")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--size", choices=SIZES, default="real")
    parser.add_argument("--work-dir", default=None, help="where the generated data goes (default: a temp dir)")
    parser.add_argument("--tiered-batches", type=int, default=500)
    parser.add_argument("--tiered-memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiered_memory_child:
        return tiered_memory_child(Path(args.tiered_memory_child), args.device, args.tiered_batches)

    device = resolve_device(args.device)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="metarun-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        Synthetic.size = args.size
        start = time.perf_counter()
        device_tasks = SyntheticTasks(str(work), "device").to(device)
        made = time.perf_counter() - start
        memmap_tasks = SyntheticTasks(str(work), "memmap").to(device)
        store = device_tasks.store
        print(f"generated data: {store.num_images:,} images 3x84x84 in {len(store.counts)} classes, "
              f"{store.nbytes / 1e9:.2f} GB as uint8 (made and decoded once in {made:.0f} s); device {device}")
        print(f"tasks: {WAYS}-way {SHOTS}-shot, {QUERIES} queries, meta-batch {META_BATCH}; "
              f"median of {args.rounds} rounds of {args.batches} meta-batches")
        rates = {"device store": time_store(device_tasks, device, args.batches, args.rounds),
                 "memmap store": time_store(memmap_tasks, device, args.batches, args.rounds)}
        jpegs = work / "jpeg"
        write_jpegs(device_tasks, jpegs)
        dataset, kind = image_folder(jpegs)
        folder_rate = time_image_folder(dataset, device, args.batches, args.rounds, args.workers)
        for name, rate in rates.items():
            print(f"  {name:<40} {rate:8.0f} episodes/s  {rate / folder_rate:6.1f}x the JPEG pipeline")
        print(f"  {'JPEG folder + DataLoader':<40} {folder_rate:8.0f} episodes/s  ({kind}, {args.workers} workers)")

        images, classes = TIERED[args.size]
        sparse = work / "tiered-sparse"
        sparse_store(sparse, images, classes)
        child = subprocess.run([sys.executable, __file__, "--tiered-memory-child", str(sparse), "--device", args.device,
                                "--tiered-batches", str(args.tiered_batches)], capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"tiered memory run failed: {child.stderr.strip().splitlines()[-1:]}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"tieredImageNet-sized memmap store ({images:,} images, {result['store_bytes'] / 1e9:.1f} GB, sparse file): "
              f"peak host memory {result['peak_bytes'] / 1e9:.2f} GB over {result['batches']} training meta-batches "
              f"({result['batches'] * META_BATCH / result['seconds']:.0f} episodes/s; {result['store']})")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
