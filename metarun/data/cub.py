"""CUB-200-2011 (Wah et al. 2011): 200 bird species, 11,788 photographs, for few-shot classification.

Read from the official archive ``CUB_200_2011.tgz`` (md5 97eceeb196236b17998738112f37df78, 1.15 GB),
downloaded and verified into ``<data.root>/cub/``. It is decoded once, streaming from the compressed
archive (nothing is extracted): every image is converted to RGB (a few are grayscale or CMYK),
optionally cropped to its box in ``bounding_boxes.txt`` (``data.crop``, default false: the whole
image, as Chen et al.), and resized to 84x84 with PIL's bilinear filter (antialiased when shrinking,
as torchvision's ``Resize`` on PIL images), without keeping the aspect ratio. Classes hold 41 to 60
images; the channel statistics are ImageNet's.

Class splits, by name (``data.split``):

- ``chen`` (default): Chen et al. 2019, "A Closer Look at Few-shot Classification"
  (wyharveychen/CloserLookFewShot, ``filelists/CUB/write_CUB_filelist.py``): the class folders sorted by
  name, index ``i % 2 == 0`` for training (100), ``i % 4 == 1`` validation (50), ``i % 4 == 3`` test (50).
  The same split as Hilliard et al. 2018 and most CUB few-shot tables since.
- ``metadataset``: Triantafillou et al. 2020, Meta-Dataset, 140 / 30 / 30: the class lists of
  google-research/meta-dataset ``meta_dataset/dataset_conversion/splits/cu_birds_splits.json``
  (what its converter reads; Meta-Dataset keeps its own image size, here 84 as for every split).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import MofNCompleteColumn

from metarun.data.cache import StoreWriter
from metarun.data.images import ImageDataset, ImageTasks
from metarun.data.official_archive import OfficialArchive, member_name_ok, stream_members
from metarun.data.store import ImageStore
from metarun.errors import DataError
from metarun.utils import stop
from metarun.utils.display import transient_progress

CUB_ARCHIVE = OfficialArchive(
    title="CUB-200-2011",
    folder="cub",
    filename="CUB_200_2011.tgz",
    url="https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
    md5="97eceeb196236b17998738112f37df78",
    max_bytes=1_300_000_000,  # the archive is 1,150,585,339 bytes
)
TOP = "CUB_200_2011"
IMAGE_SIZE = 84
RESAMPLE = Image.BILINEAR
# The largest CUB photograph is 500 pixels on a side and under 1 MB; these caps refuse anything far beyond.
MAX_JPEG_BYTES = 16 << 20
MAX_PIXELS = 4096 * 4096
MAX_TEXT_BYTES = 8 << 20  # images.txt and bounding_boxes.txt are about 0.5 MB
TEXT_FILES = ("images.txt", "classes.txt", "image_class_labels.txt", "bounding_boxes.txt")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Meta-Dataset's CUB split (140 / 30 / 30), sorted; together they are the 200 class folders of the archive.
METADATASET_SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross",
        "004.Groove_billed_Ani", "005.Crested_Auklet", "006.Least_Auklet",
        "007.Parakeet_Auklet", "010.Red_winged_Blackbird", "011.Rusty_Blackbird",
        "012.Yellow_headed_Blackbird", "013.Bobolink", "014.Indigo_Bunting",
        "016.Painted_Bunting", "017.Cardinal", "018.Spotted_Catbird",
        "019.Gray_Catbird", "021.Eastern_Towhee", "022.Chuck_will_Widow",
        "023.Brandt_Cormorant", "024.Red_faced_Cormorant", "025.Pelagic_Cormorant",
        "026.Bronzed_Cowbird", "027.Shiny_Cowbird", "029.American_Crow",
        "031.Black_billed_Cuckoo", "032.Mangrove_Cuckoo", "033.Yellow_billed_Cuckoo",
        "034.Gray_crowned_Rosy_Finch", "036.Northern_Flicker", "037.Acadian_Flycatcher",
        "038.Great_Crested_Flycatcher", "040.Olive_sided_Flycatcher", "041.Scissor_tailed_Flycatcher",
        "042.Vermilion_Flycatcher", "043.Yellow_bellied_Flycatcher", "047.American_Goldfinch",
        "048.European_Goldfinch", "049.Boat_tailed_Grackle", "050.Eared_Grebe",
        "053.Western_Grebe", "054.Blue_Grosbeak", "056.Pine_Grosbeak",
        "058.Pigeon_Guillemot", "059.California_Gull", "060.Glaucous_winged_Gull",
        "062.Herring_Gull", "063.Ivory_Gull", "065.Slaty_backed_Gull",
        "067.Anna_Hummingbird", "069.Rufous_Hummingbird", "070.Green_Violetear",
        "071.Long_tailed_Jaeger", "073.Blue_Jay", "074.Florida_Jay",
        "075.Green_Jay", "077.Tropical_Kingbird", "078.Gray_Kingbird",
        "079.Belted_Kingfisher", "081.Pied_Kingfisher", "083.White_breasted_Kingfisher",
        "086.Pacific_Loon", "087.Mallard", "088.Western_Meadowlark",
        "089.Hooded_Merganser", "090.Red_breasted_Merganser", "091.Mockingbird",
        "092.Nighthawk", "093.Clark_Nutcracker", "095.Baltimore_Oriole",
        "097.Orchard_Oriole", "098.Scott_Oriole", "099.Ovenbird",
        "100.Brown_Pelican", "102.Western_Wood_Pewee", "104.American_Pipit",
        "105.Whip_poor_Will", "106.Horned_Puffin", "107.Common_Raven",
        "108.White_necked_Raven", "109.American_Redstart", "110.Geococcyx",
        "111.Loggerhead_Shrike", "114.Black_throated_Sparrow", "115.Brewer_Sparrow",
        "116.Chipping_Sparrow", "117.Clay_colored_Sparrow", "119.Field_Sparrow",
        "120.Fox_Sparrow", "123.Henslow_Sparrow", "124.Le_Conte_Sparrow",
        "125.Lincoln_Sparrow", "126.Nelson_Sharp_tailed_Sparrow", "129.Song_Sparrow",
        "130.Tree_Sparrow", "131.Vesper_Sparrow", "132.White_crowned_Sparrow",
        "135.Bank_Swallow", "138.Tree_Swallow", "139.Scarlet_Tanager",
        "141.Artic_Tern", "142.Black_Tern", "143.Caspian_Tern",
        "144.Common_Tern", "146.Forsters_Tern", "149.Brown_Thrasher",
        "151.Black_capped_Vireo", "152.Blue_headed_Vireo", "153.Philadelphia_Vireo",
        "154.Red_eyed_Vireo", "156.White_eyed_Vireo", "157.Yellow_throated_Vireo",
        "158.Bay_breasted_Warbler", "160.Black_throated_Blue_Warbler", "161.Blue_winged_Warbler",
        "164.Cerulean_Warbler", "165.Chestnut_sided_Warbler", "166.Golden_winged_Warbler",
        "167.Hooded_Warbler", "171.Myrtle_Warbler", "173.Orange_crowned_Warbler",
        "174.Palm_Warbler", "175.Pine_Warbler", "177.Prothonotary_Warbler",
        "179.Tennessee_Warbler", "180.Wilson_Warbler", "181.Worm_eating_Warbler",
        "182.Yellow_Warbler", "183.Northern_Waterthrush", "184.Louisiana_Waterthrush",
        "185.Bohemian_Waxwing", "186.Cedar_Waxwing", "187.American_Three_toed_Woodpecker",
        "188.Pileated_Woodpecker", "189.Red_bellied_Woodpecker", "190.Red_cockaded_Woodpecker",
        "191.Red_headed_Woodpecker", "192.Downy_Woodpecker", "195.Carolina_Wren",
        "196.House_Wren", "197.Marsh_Wren",
    ),
    "val": (
        "044.Frigatebird", "051.Horned_Grebe", "052.Pied_billed_Grebe",
        "055.Evening_Grosbeak", "057.Rose_breasted_Grosbeak", "061.Heermann_Gull",
        "064.Ring_billed_Gull", "066.Western_Gull", "068.Ruby_throated_Hummingbird",
        "072.Pomarine_Jaeger", "076.Dark_eyed_Junco", "080.Green_Kingfisher",
        "084.Red_legged_Kittiwake", "096.Hooded_Oriole", "113.Baird_Sparrow",
        "121.Grasshopper_Sparrow", "127.Savannah_Sparrow", "136.Barn_Swallow",
        "140.Summer_Tanager", "145.Elegant_Tern", "150.Sage_Thrasher",
        "155.Warbling_Vireo", "159.Black_and_white_Warbler", "162.Canada_Warbler",
        "172.Nashville_Warbler", "176.Prairie_Warbler", "178.Swainson_Warbler",
        "198.Rock_Wren", "199.Winter_Wren", "200.Common_Yellowthroat",
    ),
    "test": (
        "008.Rhinoceros_Auklet", "009.Brewer_Blackbird", "015.Lazuli_Bunting",
        "020.Yellow_breasted_Chat", "028.Brown_Creeper", "030.Fish_Crow",
        "035.Purple_Finch", "039.Least_Flycatcher", "045.Northern_Fulmar",
        "046.Gadwall", "082.Ringed_Kingfisher", "085.Horned_Lark",
        "094.White_breasted_Nuthatch", "101.White_Pelican", "103.Sayornis",
        "112.Great_Grey_Shrike", "118.House_Sparrow", "122.Harris_Sparrow",
        "128.Seaside_Sparrow", "133.White_throated_Sparrow", "134.Cape_Glossy_Starling",
        "137.Cliff_Swallow", "147.Least_Tern", "148.Green_tailed_Towhee",
        "163.Cape_May_Warbler", "168.Kentucky_Warbler", "169.Magnolia_Warbler",
        "170.Mourning_Warbler", "193.Bewick_Wren", "194.Cactus_Wren",
    ),
}
# The 200 class folders of the archive, sorted by name (= by class id, 001 to 200).
CUB_CLASSES: tuple[str, ...] = tuple(sorted(c for names in METADATASET_SPLITS.values() for c in names))
# Chen et al. 2019: position in the sorted folder list, i % 2 == 0 train, i % 4 == 1 val, i % 4 == 3 test.
CHEN_SPLITS: dict[str, tuple[str, ...]] = {
    "train": tuple(c for i, c in enumerate(CUB_CLASSES) if i % 2 == 0),
    "val": tuple(c for i, c in enumerate(CUB_CLASSES) if i % 4 == 1),
    "test": tuple(c for i, c in enumerate(CUB_CLASSES) if i % 4 == 3),
}
SPLITS = {"chen": CHEN_SPLITS, "metadataset": METADATASET_SPLITS}
SPLIT_NAMES = tuple(SPLITS)

_IMAGE_PATH = re.compile(r"^(\d{3}\.[A-Za-z0-9_\-]+)/[^/\\]+\.jpe?g$", re.IGNORECASE)


class CubIndex:
    """The archive's text files, parsed and checked: which image is which class, and its bounding box."""

    def __init__(self, texts: dict[str, bytes], bad: Callable[[str], DataError]):
        def rows(name: str, width: int) -> list[list[str]]:
            try:
                lines = texts[name].decode("utf-8").splitlines()
            except UnicodeDecodeError:
                raise bad(f"{TOP}/{name} is not text") from None
            out = []
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                fields = line.split()
                if len(fields) != width:
                    raise bad(f"{TOP}/{name} line {number} has {len(fields)} fields, expected {width}")
                out.append(fields)
            return out

        def ids(values: list[str], name: str) -> list[int]:
            try:
                return [int(v) for v in values]
            except ValueError:
                raise bad(f"{TOP}/{name} has a non-integer id") from None

        classes = rows("classes.txt", 2)
        class_ids = ids([r[0] for r in classes], "classes.txt")
        self.class_of_id = dict(zip(class_ids, [r[1] for r in classes]))
        if sorted(self.class_of_id.values()) != list(CUB_CLASSES) or len(classes) != len(CUB_CLASSES):
            raise bad(f"{TOP}/classes.txt does not list CUB-200-2011's 200 classes")
        images = rows("images.txt", 2)
        image_ids = ids([r[0] for r in images], "images.txt")
        if len(set(image_ids)) != len(image_ids):
            raise bad(f"{TOP}/images.txt repeats an image id")
        self.path_of_id = dict(zip(image_ids, [r[1] for r in images]))
        labels = {i: c for i, c in zip(*[ids(list(col), "image_class_labels.txt")
                                          for col in zip(*rows("image_class_labels.txt", 2))] or [[], []])}
        boxes: dict[int, tuple[float, ...]] = {}
        for r in rows("bounding_boxes.txt", 5):
            try:
                box = tuple(float(v) for v in r[1:])
            except ValueError:
                raise bad(f"{TOP}/bounding_boxes.txt has a non-number") from None
            if not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
                raise bad(f"{TOP}/bounding_boxes.txt has an empty or invalid box for image {r[0]}")
            boxes[ids([r[0]], "bounding_boxes.txt")[0]] = box
        if set(labels) != set(self.path_of_id) or set(boxes) != set(self.path_of_id):
            raise bad(f"{TOP}/images.txt, image_class_labels.txt and bounding_boxes.txt list different images")
        self.boxes = boxes
        self.id_of_path: dict[str, int] = {}
        self.ids_of_class: dict[str, list[int]] = {c: [] for c in CUB_CLASSES}
        for image_id in sorted(self.path_of_id):
            rel = self.path_of_id[image_id]
            match = _IMAGE_PATH.match(rel)
            cls = self.class_of_id.get(labels[image_id])
            if not match or not member_name_ok(rel) or match.group(1) != cls:
                raise bad(f"{TOP}/images.txt lists {rel!r} for class {cls}, expected CLASS_FOLDER/NAME.jpg")
            self.id_of_path[f"{TOP}/images/{rel}"] = image_id
            self.ids_of_class[cls].append(image_id)
        empty = [c for c, v in self.ids_of_class.items() if not v]
        if empty:
            raise bad(f"{TOP}/images.txt lists no image of class {empty[0]}")

    @property
    def n_images(self) -> int:
        return len(self.path_of_id)


def read_index(path: Path, archive: OfficialArchive = CUB_ARCHIVE) -> CubIndex:
    """First pass over the archive: its four text files (they may come after the images in the tar)."""
    wanted = {f"{TOP}/{name}" for name in TEXT_FILES}
    texts = {name.rsplit("/", 1)[-1]: data
             for name, data in stream_members(archive, path, wanted.__contains__, MAX_TEXT_BYTES, stop.check)}
    missing = [name for name in TEXT_FILES if name not in texts]
    if missing:
        raise archive.bad(path, f"it has no {TOP}/{missing[0]} (truncated, or not CUB-200-2011)")
    return CubIndex(texts, lambda problem: archive.bad(path, problem))


def decode_image(data: bytes, box: tuple[float, ...] | None, where: str, bad: Callable[[str], DataError]) -> np.ndarray:
    """One JPEG to uint8 (3, 84, 84): RGB, cropped to ``box`` (x, y, width, height) if given, bilinear resize."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > MAX_PIXELS or width < 1 or height < 1:
                raise bad(f"{where} is {width}x{height} pixels, beyond what a CUB photograph can be")
            rgb = im.convert("RGB")  # grayscale and CMYK photographs too
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise bad(f"{where} does not decode as an image ({e})") from None
    if box is not None:
        x, y, w, h = box
        # The box's pixels, rounded outwards and clipped to the image.
        left, top = max(0, math.floor(x)), max(0, math.floor(y))
        right, bottom = min(width, math.ceil(x + w)), min(height, math.ceil(y + h))
        if right <= left or bottom <= top:
            raise bad(f"the bounding box of {where} lies outside the image")
        rgb = rgb.crop((left, top, right, bottom))
    out = np.asarray(rgb.resize((IMAGE_SIZE, IMAGE_SIZE), RESAMPLE), dtype=np.uint8)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def read_cub(path: Path, crop: bool, archive: OfficialArchive = CUB_ARCHIVE) -> Iterator[tuple[str, np.ndarray]]:
    """(class folder name, uint8 (n, 3, 84, 84)) for the 200 classes in class-id order, each class's images in
    image-id order. Two passes over the compressed stream (text files, then images); decoded classes are
    held only until every earlier class is complete, so memory stays at about one class when the archive
    is in folder order, as the official one is."""
    index = read_index(path, archive)

    def bad(problem: str) -> DataError:
        return archive.bad(path, problem)

    pending: dict[str, dict[int, np.ndarray]] = {c: {} for c in CUB_CLASSES}
    order = iter(CUB_CLASSES)
    next_class = next(order)
    found = 0
    with transient_progress(MofNCompleteColumn()) as progress:
        task = progress.add_task("decoding CUB-200-2011", total=index.n_images)
        for name, data in stream_members(archive, path, index.id_of_path.__contains__, MAX_JPEG_BYTES, stop.check):
            image_id = index.id_of_path[name]
            cls = name.split("/")[2]  # the folder images.txt gives for this id: checked in CubIndex
            if image_id in pending[cls]:
                raise bad(f"{name} appears twice")
            pending[cls][image_id] = decode_image(data, index.boxes[image_id] if crop else None, name, bad)
            found += 1
            progress.advance(task)
            while next_class is not None and len(pending[next_class]) == len(index.ids_of_class[next_class]):
                stop.check()  # between classes: a Ctrl-C stops the decode cleanly
                images = pending.pop(next_class)
                yield next_class, np.stack([images[i] for i in index.ids_of_class[next_class]])
                next_class = next(order, None)
    if next_class is not None:
        missing = [index.path_of_id[i] for i in index.ids_of_class[next_class] if i not in pending[next_class]]
        raise bad(f"it lacks {missing[0] if missing else 'images'} listed in images.txt ({found} of "
                  f"{index.n_images} images found: truncated?)")


# ----------------------------------------------------------------------------------------- the dataset

class CUB(ImageDataset):
    """CUB-200-2011 under Chen et al.'s (``chen``, 100/50/50) or Meta-Dataset's (``metadataset``, 140/30/30)
    class split; ``crop``: crop each photograph to its bounding box before resizing to 84x84."""

    name = "cub"
    title = "CUB-200-2011"
    channels = 3
    image_size = IMAGE_SIZE
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    split_names = SPLIT_NAMES
    checksum = "md5"  # the official archive's, checked by locate()
    downloads = True

    def __init__(self, root: Path, split: str, crop: bool = False):
        super().__init__(root, split, crop=bool(crop))
        self.crop = bool(crop)

    def archive(self) -> OfficialArchive:
        return CUB_ARCHIVE  # looked up when used: tests swap in the spec of their small archive

    def locate(self, download: bool) -> list[Path]:
        return [self.archive().locate(self.root, download)]

    def layout(self) -> str:
        spec = self.archive()
        return (f"{spec.path(self.root)}: the official CUB-200-2011 archive ({spec.url}, md5 {spec.md5}), "
                f"downloaded there when data.download is true; it is read as is, never unpacked")

    def cache_key(self) -> dict:
        return {"channels": self.channels, "image_size": self.image_size, "crop": self.crop,
                "resample": "bilinear"}

    def decode(self, files: list[Path], writer: StoreWriter) -> None:
        for name, images in read_cub(files[0], self.crop, self.archive()):
            writer.add_class(name, images)

    def split_classes(self, store: ImageStore) -> dict[str, list[int]]:
        position = {name: i for i, name in enumerate(store.class_names)}
        missing = [c for c in CUB_CLASSES if c not in position]
        if missing:
            raise DataError(f"the decoded CUB-200-2011 store lacks class {missing[0]}: delete it so it is decoded again")
        return {split: [position[c] for c in names] for split, names in SPLITS[self.split].items()}


class CUBTasks(ImageTasks):
    """N-way K-shot CUB-200-2011 tasks. ``split``: ``chen`` (Chen et al. 2019, 100/50/50, the default) or
    ``metadataset`` (Triantafillou et al. 2020, 140/30/30); ``crop``: crop to the bounding boxes (default
    false, as Chen). The archive is read from ``<root>/cub/`` (downloaded if missing and ``download``)."""

    dataset = CUB

    def __init__(self, ways: int, shots: int, queries: int, root: str, split: str = "chen", crop: bool = False,
                 cache_dir: str | None = None, download: bool = True, residency: str = "auto",
                 memory_share: float = 0.5, normalize: bool = True, augment: tuple[str, ...] = (),
                 train_ways: int | None = None, train_shots: int | None = None, train_queries: int | None = None,
                 channels: int = 3, image_size: int = IMAGE_SIZE):
        self.check_image_shape(channels, image_size)
        super().__init__(ways, shots, queries, root, split, cache_dir, download, residency, memory_share, normalize,
                         augment, train_ways, train_shots, train_queries, crop=crop)
