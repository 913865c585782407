"""Prompt templates and class names for zero-shot classification, and their file formats.

A template is a ``str.format`` string with exactly one empty replacement field ``{}``, filled with the class name
(``"a photo of a {}."``); write a literal brace as ``{{`` or ``}}``. The template lists here are the ones
open_clip evaluates with, so that zero-shot numbers are comparable to published ones.

Files:

* templates (:func:`load_templates`): UTF-8 text, one template per line; blank lines and lines starting with
  ``#`` are skipped.
* class names (:func:`load_class_names`): a ``.json`` file holding a list of names (label order) or an object
  ``{folder: name}``; any other file is UTF-8 text with one name per line, in label order.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Mapping, Sequence

# The 80 prompts of OpenAI's CLIP ImageNet evaluation, in their order. Copied from open_clip
# (open_clip/zero_shot_metadata.py, OPENAI_IMAGENET_TEMPLATES, open_clip_torch 3.3.0), where they are lambdas:
# here each is the format string ``template("{}")``. Not imported: open_clip is an optional dependency and its
# import is slow. tests/test_clip_zeroshot.py checks the copy against the installed open_clip.
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)

# open_clip's SIMPLE_IMAGENET_TEMPLATES: the 7 of the 80 that OpenAI's CLIP notebook selected; 11x fewer texts to embed.
SIMPLE_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.", "a {} in a video game.",
    "art of the {}.", "a photo of the small {}.",
)

# The ImageNet-1K class names in label order (the sorted WordNet ids n01440764, ...), as open_clip writes them
# (open_clip/zero_shot_metadata.py, IMAGENET_CLASSNAMES, open_clip_torch 3.3.0): readable names from
# OpenAI's CLIP notebook. Two names repeat ("missile", "sunglasses"): two pairs of ImageNet classes share them there.
IMAGENET_CLASSNAMES: tuple[str, ...] = (
    "tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark", "electric ray", "stingray",
    "rooster", "hen", "ostrich", "brambling", "goldfinch", "house finch", "junco", "indigo bunting",
    "American robin", "bulbul", "jay", "magpie", "chickadee", "American dipper", "kite (bird of prey)",
    "bald eagle", "vulture", "great grey owl", "fire salamander", "smooth newt", "newt", "spotted salamander",
    "axolotl", "American bullfrog", "tree frog", "tailed frog", "loggerhead sea turtle", "leatherback sea turtle",
    "mud turtle", "terrapin", "box turtle", "banded gecko", "green iguana", "Carolina anole",
    "desert grassland whiptail lizard", "agama", "frilled-necked lizard", "alligator lizard", "Gila monster",
    "European green lizard", "chameleon", "Komodo dragon", "Nile crocodile", "American alligator", "triceratops",
    "worm snake", "ring-necked snake", "eastern hog-nosed snake", "smooth green snake", "kingsnake", "garter snake",
    "water snake", "vine snake", "night snake", "boa constrictor", "African rock python", "Indian cobra",
    "green mamba", "sea snake", "Saharan horned viper", "eastern diamondback rattlesnake", "sidewinder rattlesnake",
    "trilobite", "harvestman", "scorpion", "yellow garden spider", "barn spider", "European garden spider",
    "southern black widow", "tarantula", "wolf spider", "tick", "centipede", "black grouse", "ptarmigan",
    "ruffed grouse", "prairie grouse", "peafowl", "quail", "partridge", "african grey parrot", "macaw",
    "sulphur-crested cockatoo", "lorikeet", "coucal", "bee eater", "hornbill", "hummingbird", "jacamar", "toucan",
    "duck", "red-breasted merganser", "goose", "black swan", "tusker", "echidna", "platypus", "wallaby", "koala",
    "wombat", "jellyfish", "sea anemone", "brain coral", "flatworm", "nematode", "conch", "snail", "slug",
    "sea slug", "chiton", "chambered nautilus", "Dungeness crab", "rock crab", "fiddler crab", "red king crab",
    "American lobster", "spiny lobster", "crayfish", "hermit crab", "isopod", "white stork", "black stork",
    "spoonbill", "flamingo", "little blue heron", "great egret", "bittern bird", "crane bird", "limpkin",
    "common gallinule", "American coot", "bustard", "ruddy turnstone", "dunlin", "common redshank", "dowitcher",
    "oystercatcher", "pelican", "king penguin", "albatross", "grey whale", "killer whale", "dugong", "sea lion",
    "Chihuahua", "Japanese Chin", "Maltese", "Pekingese", "Shih Tzu", "King Charles Spaniel", "Papillon",
    "toy terrier", "Rhodesian Ridgeback", "Afghan Hound", "Basset Hound", "Beagle", "Bloodhound",
    "Bluetick Coonhound", "Black and Tan Coonhound", "Treeing Walker Coonhound", "English foxhound",
    "Redbone Coonhound", "borzoi", "Irish Wolfhound", "Italian Greyhound", "Whippet", "Ibizan Hound",
    "Norwegian Elkhound", "Otterhound", "Saluki", "Scottish Deerhound", "Weimaraner", "Staffordshire Bull Terrier",
    "American Staffordshire Terrier", "Bedlington Terrier", "Border Terrier", "Kerry Blue Terrier", "Irish Terrier",
    "Norfolk Terrier", "Norwich Terrier", "Yorkshire Terrier", "Wire Fox Terrier", "Lakeland Terrier",
    "Sealyham Terrier", "Airedale Terrier", "Cairn Terrier", "Australian Terrier", "Dandie Dinmont Terrier",
    "Boston Terrier", "Miniature Schnauzer", "Giant Schnauzer", "Standard Schnauzer", "Scottish Terrier",
    "Tibetan Terrier", "Australian Silky Terrier", "Soft-coated Wheaten Terrier", "West Highland White Terrier",
    "Lhasa Apso", "Flat-Coated Retriever", "Curly-coated Retriever", "Golden Retriever", "Labrador Retriever",
    "Chesapeake Bay Retriever", "German Shorthaired Pointer", "Vizsla", "English Setter", "Irish Setter",
    "Gordon Setter", "Brittany dog", "Clumber Spaniel", "English Springer Spaniel", "Welsh Springer Spaniel",
    "Cocker Spaniel", "Sussex Spaniel", "Irish Water Spaniel", "Kuvasz", "Schipperke", "Groenendael dog",
    "Malinois", "Briard", "Australian Kelpie", "Komondor", "Old English Sheepdog", "Shetland Sheepdog", "collie",
    "Border Collie", "Bouvier des Flandres dog", "Rottweiler", "German Shepherd Dog", "Dobermann",
    "Miniature Pinscher", "Greater Swiss Mountain Dog", "Bernese Mountain Dog", "Appenzeller Sennenhund",
    "Entlebucher Sennenhund", "Boxer", "Bullmastiff", "Tibetan Mastiff", "French Bulldog", "Great Dane",
    "St. Bernard", "husky", "Alaskan Malamute", "Siberian Husky", "Dalmatian", "Affenpinscher", "Basenji", "pug",
    "Leonberger", "Newfoundland dog", "Great Pyrenees dog", "Samoyed", "Pomeranian", "Chow Chow", "Keeshond",
    "brussels griffon", "Pembroke Welsh Corgi", "Cardigan Welsh Corgi", "Toy Poodle", "Miniature Poodle",
    "Standard Poodle", "Mexican hairless dog (xoloitzcuintli)", "grey wolf", "Alaskan tundra wolf",
    "red wolf or maned wolf", "coyote", "dingo", "dhole", "African wild dog", "hyena", "red fox", "kit fox",
    "Arctic fox", "grey fox", "tabby cat", "tiger cat", "Persian cat", "Siamese cat", "Egyptian Mau", "cougar",
    "lynx", "leopard", "snow leopard", "jaguar", "lion", "tiger", "cheetah", "brown bear", "American black bear",
    "polar bear", "sloth bear", "mongoose", "meerkat", "tiger beetle", "ladybug", "ground beetle",
    "longhorn beetle", "leaf beetle", "dung beetle", "rhinoceros beetle", "weevil", "fly", "bee", "ant",
    "grasshopper", "cricket insect", "stick insect", "cockroach", "praying mantis", "cicada", "leafhopper",
    "lacewing", "dragonfly", "damselfly", "red admiral butterfly", "ringlet butterfly", "monarch butterfly",
    "small white butterfly", "sulphur butterfly", "gossamer-winged butterfly", "starfish", "sea urchin",
    "sea cucumber", "cottontail rabbit", "hare", "Angora rabbit", "hamster", "porcupine", "fox squirrel", "marmot",
    "beaver", "guinea pig", "common sorrel horse", "zebra", "pig", "wild boar", "warthog", "hippopotamus", "ox",
    "water buffalo", "bison", "ram (adult male sheep)", "bighorn sheep", "Alpine ibex", "hartebeest",
    "impala (antelope)", "gazelle", "arabian camel", "llama", "weasel", "mink", "European polecat",
    "black-footed ferret", "otter", "skunk", "badger", "armadillo", "three-toed sloth", "orangutan", "gorilla",
    "chimpanzee", "gibbon", "siamang", "guenon", "patas monkey", "baboon", "macaque", "langur",
    "black-and-white colobus", "proboscis monkey", "marmoset", "white-headed capuchin", "howler monkey",
    "titi monkey", "Geoffroy's spider monkey", "common squirrel monkey", "ring-tailed lemur", "indri",
    "Asian elephant", "African bush elephant", "red panda", "giant panda", "snoek fish", "eel", "silver salmon",
    "rock beauty fish", "clownfish", "sturgeon", "gar fish", "lionfish", "pufferfish", "abacus", "abaya",
    "academic gown", "accordion", "acoustic guitar", "aircraft carrier", "airliner", "airship", "altar",
    "ambulance", "amphibious vehicle", "analog clock", "apiary", "apron", "trash can", "assault rifle", "backpack",
    "bakery", "balance beam", "balloon", "ballpoint pen", "Band-Aid", "banjo", "baluster / handrail", "barbell",
    "barber chair", "barbershop", "barn", "barometer", "barrel", "wheelbarrow", "baseball", "basketball",
    "bassinet", "bassoon", "swimming cap", "bath towel", "bathtub", "station wagon", "lighthouse", "beaker",
    "military hat (bearskin or shako)", "beer bottle", "beer glass", "bell tower", "baby bib", "tandem bicycle",
    "bikini", "ring binder", "binoculars", "birdhouse", "boathouse", "bobsleigh", "bolo tie", "poke bonnet",
    "bookcase", "bookstore", "bottle cap", "hunting bow", "bow tie", "brass memorial plaque", "bra", "breakwater",
    "breastplate", "broom", "bucket", "buckle", "bulletproof vest", "high-speed train", "butcher shop", "taxicab",
    "cauldron", "candle", "cannon", "canoe", "can opener", "cardigan", "car mirror", "carousel", "tool kit",
    "cardboard box / carton", "car wheel", "automated teller machine", "cassette", "cassette player", "castle",
    "catamaran", "CD player", "cello", "mobile phone", "chain", "chain-link fence", "chain mail", "chainsaw",
    "storage chest", "chiffonier", "bell or wind chime", "china cabinet", "Christmas stocking", "church",
    "movie theater", "cleaver", "cliff dwelling", "cloak", "clogs", "cocktail shaker", "coffee mug", "coffeemaker",
    "spiral or coil", "combination lock", "computer keyboard", "candy store", "container ship", "convertible",
    "corkscrew", "cornet", "cowboy boot", "cowboy hat", "cradle", "construction crane", "crash helmet", "crate",
    "infant bed", "Crock Pot", "croquet ball", "crutch", "cuirass", "dam", "desk", "desktop computer",
    "rotary dial telephone", "diaper", "digital clock", "digital watch", "dining table", "dishcloth", "dishwasher",
    "disc brake", "dock", "dog sled", "dome", "doormat", "drilling rig", "drum", "drumstick", "dumbbell",
    "Dutch oven", "electric fan", "electric guitar", "electric locomotive", "entertainment center", "envelope",
    "espresso machine", "face powder", "feather boa", "filing cabinet", "fireboat", "fire truck", "fire screen",
    "flagpole", "flute", "folding chair", "football helmet", "forklift", "fountain", "fountain pen",
    "four-poster bed", "freight car", "French horn", "frying pan", "fur coat", "garbage truck",
    "gas mask or respirator", "gas pump", "goblet", "go-kart", "golf ball", "golf cart", "gondola", "gong", "gown",
    "grand piano", "greenhouse", "radiator grille", "grocery store", "guillotine", "hair clip", "hair spray",
    "half-track", "hammer", "hamper", "hair dryer", "hand-held computer", "handkerchief", "hard disk drive",
    "harmonica", "harp", "combine harvester", "hatchet", "holster", "home theater", "honeycomb", "hook",
    "hoop skirt", "gymnastic horizontal bar", "horse-drawn vehicle", "hourglass", "iPod", "clothes iron",
    "carved pumpkin", "jeans", "jeep", "T-shirt", "jigsaw puzzle", "rickshaw", "joystick", "kimono", "knee pad",
    "knot", "lab coat", "ladle", "lampshade", "laptop computer", "lawn mower", "lens cap", "letter opener",
    "library", "lifeboat", "lighter", "limousine", "ocean liner", "lipstick", "slip-on shoe", "lotion",
    "music speaker", "loupe magnifying glass", "sawmill", "magnetic compass", "messenger bag", "mailbox", "tights",
    "one-piece bathing suit", "manhole cover", "maraca", "marimba", "mask", "matchstick", "maypole", "maze",
    "measuring cup", "medicine cabinet", "megalith", "microphone", "microwave oven", "military uniform", "milk can",
    "minibus", "miniskirt", "minivan", "missile", "mitten", "mixing bowl", "mobile home", "ford model t", "modem",
    "monastery", "monitor", "moped", "mortar and pestle", "graduation cap", "mosque", "mosquito net", "vespa",
    "mountain bike", "tent", "computer mouse", "mousetrap", "moving van", "muzzle", "metal nail", "neck brace",
    "necklace", "baby pacifier", "notebook computer", "obelisk", "oboe", "ocarina", "odometer", "oil filter",
    "pipe organ", "oscilloscope", "overskirt", "bullock cart", "oxygen mask", "product packet / packaging",
    "paddle", "paddle wheel", "padlock", "paintbrush", "pajamas", "palace", "pan flute", "paper towel", "parachute",
    "parallel bars", "park bench", "parking meter", "railroad car", "patio", "payphone", "pedestal", "pencil case",
    "pencil sharpener", "perfume", "Petri dish", "photocopier", "plectrum", "Pickelhaube", "picket fence",
    "pickup truck", "pier", "piggy bank", "pill bottle", "pillow", "ping-pong ball", "pinwheel", "pirate ship",
    "drink pitcher", "block plane", "planetarium", "plastic bag", "plate rack", "farm plow", "plunger",
    "Polaroid camera", "pole", "police van", "poncho", "pool table", "soda bottle", "plant pot", "potter's wheel",
    "power drill", "prayer rug", "printer", "prison", "missile", "projector", "hockey puck", "punching bag",
    "purse", "quill", "quilt", "race car", "racket", "radiator", "radio", "radio telescope", "rain barrel",
    "recreational vehicle", "fishing casting reel", "reflex camera", "refrigerator", "remote control", "restaurant",
    "revolver", "rifle", "rocking chair", "rotisserie", "eraser", "rugby ball", "ruler measuring stick", "sneaker",
    "safe", "safety pin", "salt shaker", "sandal", "sarong", "saxophone", "scabbard", "weighing scale",
    "school bus", "schooner", "scoreboard", "CRT monitor", "screw", "screwdriver", "seat belt", "sewing machine",
    "shield", "shoe store", "shoji screen / room divider", "shopping basket", "shopping cart", "shovel",
    "shower cap", "shower curtain", "ski", "balaclava ski mask", "sleeping bag", "slide rule", "sliding door",
    "slot machine", "snorkel", "snowmobile", "snowplow", "soap dispenser", "soccer ball", "sock",
    "solar thermal collector", "sombrero", "soup bowl", "keyboard space bar", "space heater", "space shuttle",
    "spatula", "motorboat", "spider web", "spindle", "sports car", "spotlight", "stage", "steam locomotive",
    "through arch bridge", "steel drum", "stethoscope", "scarf", "stone wall", "stopwatch", "stove", "strainer",
    "tram", "stretcher", "couch", "stupa", "submarine", "suit", "sundial", "sunglasses", "sunglasses", "sunscreen",
    "suspension bridge", "mop", "sweatshirt", "swim trunks / shorts", "swing", "electrical switch", "syringe",
    "table lamp", "tank", "tape player", "teapot", "teddy bear", "television", "tennis ball", "thatched roof",
    "front curtain", "thimble", "threshing machine", "throne", "tile roof", "toaster", "tobacco shop",
    "toilet seat", "torch", "totem pole", "tow truck", "toy store", "tractor", "semi-trailer truck", "tray",
    "trench coat", "tricycle", "trimaran", "tripod", "triumphal arch", "trolleybus", "trombone", "hot tub",
    "turnstile", "typewriter keyboard", "umbrella", "unicycle", "upright piano", "vacuum cleaner", "vase",
    "vaulted or arched ceiling", "velvet fabric", "vending machine", "vestment", "viaduct", "violin", "volleyball",
    "waffle iron", "wall clock", "wallet", "wardrobe", "military aircraft", "sink", "washing machine",
    "water bottle", "water jug", "water tower", "whiskey jug", "whistle", "hair wig", "window screen",
    "window shade", "Windsor tie", "wine bottle", "airplane wing", "wok", "wooden spoon", "wool",
    "split-rail fence", "shipwreck", "sailboat", "yurt", "website", "comic book", "crossword",
    "traffic or street sign", "traffic light", "dust jacket", "menu", "plate", "guacamole", "consomme", "hot pot",
    "trifle", "ice cream", "popsicle", "baguette", "bagel", "pretzel", "cheeseburger", "hot dog", "mashed potatoes",
    "cabbage", "broccoli", "cauliflower", "zucchini", "spaghetti squash", "acorn squash", "butternut squash",
    "cucumber", "artichoke", "bell pepper", "cardoon", "mushroom", "Granny Smith apple", "strawberry", "orange",
    "lemon", "fig", "pineapple", "banana", "jackfruit", "cherimoya (custard apple)", "pomegranate", "hay",
    "carbonara", "chocolate syrup", "dough", "meatloaf", "pizza", "pot pie", "burrito", "red wine", "espresso",
    "tea cup", "eggnog", "mountain", "bubble", "cliff", "coral reef", "geyser", "lakeshore", "promontory",
    "sandbar", "beach", "valley", "volcano", "baseball player", "bridegroom", "scuba diver", "rapeseed", "daisy",
    "yellow lady's slipper", "corn", "acorn", "rose hip", "horse chestnut seed", "coral fungus", "agaric",
    "gyromitra", "stinkhorn mushroom", "earth star fungus", "hen of the woods mushroom", "bolete", "corn cob",
    "toilet paper",
)


# ------------------------------------------------------------------------------------------ checks
def check_template(template: str, where: str = "template") -> str:
    """``template`` if it is a format string with exactly one ``{}`` field, else ValueError (``where`` names it)."""
    if not isinstance(template, str):
        raise ValueError(f"{where} is a {type(template).__name__}, not a string; write it as 'a photo of a {{}}.'")
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as error:  # a lone brace
        raise ValueError(f"{where} {template!r} is not a valid format string ({error}); write a literal brace "
                         "as {{ or }}") from None
    if fields != [("", "", None)]:
        raise ValueError(f"{where} {template!r} must contain the class-name placeholder {{}} exactly once, and no "
                         "other field ({0}, {c}, {:>5}, ...); write a literal brace as {{ or }}")
    return template


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """The templates as a tuple, each checked by :func:`check_template`; an empty list is refused."""
    if isinstance(templates, str):
        raise ValueError(f"templates is the single string {templates!r}; pass a list of templates")
    templates = tuple(templates)
    if not templates:
        raise ValueError("the template list is empty; pass at least one template such as 'a photo of a {}.'")
    return tuple(check_template(t, f"template {i}") for i, t in enumerate(templates))


def check_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    """The class names as a tuple (label order); an empty list, a non-string or a blank name is refused.

    Repeated names are allowed (ImageNet's readable names repeat two): their classes get the same weights.
    """
    if isinstance(class_names, str):
        raise ValueError(f"class_names is the single string {class_names!r}; pass a list of names in label order")
    class_names = tuple(class_names)
    if not class_names:
        raise ValueError("the class name list is empty; pass one name per class, in label order")
    for i, name in enumerate(class_names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class name {i} is {name!r}; every class needs a non-blank string name")
    return class_names


# ------------------------------------------------------------------------------------------ files
def load_templates(path: str | Path) -> tuple[str, ...]:
    """Templates from a text file: one per line, each with one ``{}``; blank lines and ``#`` lines are skipped.

    Surrounding whitespace of a line is dropped. Raises FileNotFoundError or ValueError (with the line number).
    """
    path = Path(path)
    templates = []
    for number, line in enumerate(_read_text(path, "templates").splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            templates.append(check_template(line, f"{path}:{number}: template"))
    if not templates:
        raise ValueError(f"{path} holds no template; write one per line, each with {{}} for the class name")
    return tuple(templates)


def load_class_names(path: str | Path) -> list[str] | dict[str, str]:
    """Class names from a file: a list in label order, or a ``{folder: name}`` dict.

    ``.json``: a list of strings (label order) or an object mapping folder names to readable names. Otherwise
    UTF-8 text, one name per line in label order (surrounding whitespace dropped; trailing blank lines allowed, a
    blank line between names is refused: it would shift every label after it). Pass the result to
    :func:`folder_class_names` to line it up with a dataset's class folders.
    """
    path = Path(path)
    text = _read_text(path, "class names")
    if path.suffix.lower() == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); write a list of names or an object "
                             "{folder: name}") from None
        if isinstance(names, dict):
            for folder, name in names.items():
                if not isinstance(name, str) or not name.strip():
                    raise ValueError(f"{path}: the name of folder {folder!r} is {name!r}; give a non-blank string")
            if not names:
                raise ValueError(f"{path} maps no folder; write {{\"folder\": \"readable name\", ...}}")
            return dict(names)
        if not isinstance(names, list):
            raise ValueError(f"{path} holds a JSON {type(names).__name__}; write a list of names in label order "
                             "or an object {folder: name}")
        return list(_checked(names, path))
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line:
            raise ValueError(f"{path}:{number} is blank; write one class name per line, in label order, with no "
                             "blank line between names")
    return list(_checked(lines, path))


def folder_class_names(folders: Sequence[str],
                       names: Sequence[str] | Mapping[str, str] | str | Path | None = None) -> list[str]:
    """The class names of an image-folder dataset, in its label order.

    ``folders``: the class folder names in label order (``classes`` of an evamim folder source or of torchvision's
    ``ImageFolder``: sorted names). ``names``: None uses the folder names themselves; a list gives one name per
    folder, in the same order; a mapping (or the path of a names file, see :func:`load_class_names`) maps each
    folder to its readable name, and may hold more folders than the dataset has.
    """
    folders = check_class_names(folders)
    if names is None:
        return list(folders)
    source = ""
    if isinstance(names, (str, Path)):
        source, names = f" in {names}", load_class_names(names)
    if isinstance(names, Mapping):
        missing = [folder for folder in folders if folder not in names]
        if missing:
            shown = ", ".join(repr(folder) for folder in missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise ValueError(f"{len(missing)} class folder(s) missing from the class names{source}: {shown}; add a "
                             f"\"{missing[0]}\": \"readable name\" entry for each")
        return list(check_class_names([names[folder] for folder in folders]))
    names = check_class_names(names)
    if len(names) != len(folders):
        raise ValueError(f"{len(names)} class names{source} for {len(folders)} class folders; give one name per "
                         "folder in label (sorted folder) order, or a {folder: name} mapping")
    return list(names)


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist (or is not a file)")
    return path.read_text(encoding="utf-8")


def _checked(names: list, path: Path) -> tuple[str, ...]:
    try:
        return check_class_names(names)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
