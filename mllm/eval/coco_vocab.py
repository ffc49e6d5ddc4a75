"""The COCO 80-category vocabulary used by CHAIR: synonyms per category and two-word merge rules.

Design choices (this table is written for mllm; it follows the conventions of the CHAIR paper's tables,
not their exact word lists):
- Keys are the 80 COCO category names exactly as written in `instances_*.json`, in COCO category order.
  A key is also the "node word" that a mention maps to, so COCO instance annotations map to themselves.
- Synonyms are written in singular form; captions and synonyms both pass through the same
  singularizer (`mllm.eval.chair.singularize`), so a plural listed here would also work.
- Ambiguous words are left out where a COCO-style caption would misfire often: bare "glass" (eyeglasses,
  windows), "vehicle" (car, bus or truck), "meter", "coach", "crane", "chicken"/"turkey" (food).
- Known improvements over the paper's table: "motor bike", "cheesecake" and "hair dryer" match (no
  leading-space or spelling misses); "brother", "pedestrian", "coffee table" and "remote control" are
  included; no capitalised entries (captions are lowercased before matching).
- Two-word merges (`COCO_DOUBLE_WORDS`): every multi-word synonym maps to itself (so "hot dog" never
  fires "dog" and "teddy bear" never fires "bear"); "baby X"/"adult X" map to X for animals (so "baby"
  does not fire "person"); "passenger jet"/"passenger train"; "bow tie" -> tie; "toilet seat" -> toilet;
  "home plate" and "train track" merge into non-objects so "plate"/"train" do not fire; "computer
  mouse/monitor/keyboard" drop "computer" (which would otherwise fire "laptop").
"""

from __future__ import annotations

# canonical COCO category name (node word) -> synonyms (the name itself first)
COCO_SYNONYMS: dict[str, list[str]] = {
    "person": [
        "person", "people", "man", "woman", "men", "women", "girl", "boy", "kid", "child", "children", "baby",
        "adult", "lady", "guy", "gentleman", "male", "female", "teenager", "teen", "toddler", "infant",
        "chef", "baker", "cook", "waiter", "waitress", "worker", "rider", "biker", "passenger", "pedestrian",
        "player", "skier", "snowboarder", "skater", "skateboarder", "surfer", "batter", "catcher", "pitcher",
        "umpire", "athlete", "policeman", "policewoman", "cop", "officer", "soldier", "fireman", "doctor",
        "nurse", "student", "tourist", "traveler", "customer", "spectator", "cowboy", "bride", "groom",
        "mother", "father", "mom", "dad", "sister", "brother", "daughter", "son", "husband", "wife",
        "grandmother", "grandfather", "friend",
    ],
    "bicycle": ["bicycle", "bike", "cycle"],
    "car": [
        "car", "automobile", "van", "minivan", "sedan", "suv", "taxi", "cab", "jeep", "coupe", "hatchback",
        "convertible", "limousine",
    ],
    "motorcycle": ["motorcycle", "motorbike", "motor bike", "motor cycle", "scooter", "moped", "dirt bike"],
    "airplane": [
        "airplane", "plane", "air plane", "aeroplane", "aircraft", "airliner", "jetliner", "jet", "jumbo jet",
    ],
    "bus": ["bus", "minibus", "school bus", "double decker"],
    "train": ["train", "locomotive", "tram", "streetcar", "subway"],
    "truck": ["truck", "pickup", "lorry", "firetruck", "fire truck"],
    "boat": [
        "boat", "ship", "sailboat", "motorboat", "speedboat", "powerboat", "rowboat", "tugboat", "houseboat",
        "lifeboat", "steamboat", "riverboat", "paddleboat", "yacht", "canoe", "kayak", "dinghy", "skiff",
        "catamaran", "ferry", "barge", "schooner", "trawler", "freighter", "vessel", "battleship", "steamship",
        "watercraft",
    ],
    "traffic light": ["traffic light", "traffic signal", "street light", "streetlight", "stop light", "stoplight"],
    "fire hydrant": ["fire hydrant", "hydrant"],
    "stop sign": ["stop sign"],
    "parking meter": ["parking meter"],
    "bench": ["bench"],
    "bird": [
        "bird", "seagull", "gull", "pigeon", "sparrow", "duck", "goose", "swan", "owl", "eagle", "hawk",
        "falcon", "osprey", "vulture", "parrot", "parakeet", "macaw", "cockatoo", "cockatiel", "robin",
        "finch", "bluebird", "blackbird", "crow", "raven", "magpie", "dove", "pelican", "heron", "egret",
        "flamingo", "cormorant", "puffin", "penguin", "ostrich", "peacock", "pheasant", "quail", "rooster",
        "hen", "hummingbird", "woodpecker", "kingfisher", "mallard", "sandpiper", "songbird", "seabird",
        "waterfowl", "fowl", "gosling", "duckling",
    ],
    "cat": ["cat", "kitten", "kitty", "feline", "tabby"],
    "dog": [
        "dog", "puppy", "pup", "doggy", "doggie", "canine", "mutt", "hound", "terrier", "poodle", "beagle",
        "bulldog", "labrador", "retriever", "collie", "corgi", "pug", "chihuahua", "dachshund", "husky",
        "greyhound", "spaniel", "rottweiler", "doberman", "schnauzer", "pitbull", "sheepdog", "sheep dog",
    ],
    "horse": ["horse", "pony", "colt", "foal", "mare", "stallion", "racehorse", "equine", "mustang", "clydesdale"],
    "sheep": ["sheep", "lamb", "ram", "ewe", "goat"],
    "cow": ["cow", "cattle", "calf", "bull", "ox", "heifer", "steer", "buffalo", "bison", "holstein"],
    "elephant": ["elephant"],
    "bear": ["bear", "panda", "grizzly", "polar bear", "cub"],
    "zebra": ["zebra"],
    "giraffe": ["giraffe"],
    "backpack": ["backpack", "knapsack", "rucksack"],
    "umbrella": ["umbrella", "parasol"],
    "handbag": ["handbag", "purse", "hand bag", "tote"],
    "tie": ["tie", "necktie", "bow tie"],
    "suitcase": ["suitcase", "suit case", "luggage"],
    "frisbee": ["frisbee"],
    "skis": ["skis", "ski"],
    "snowboard": ["snowboard"],
    "sports ball": [
        "sports ball", "ball", "football", "basketball", "volleyball", "softball", "soccer ball",
        "tennis ball", "beach ball",
    ],
    "kite": ["kite"],
    "baseball bat": ["baseball bat", "bat"],
    "baseball glove": ["baseball glove", "glove", "mitt", "baseball mitt"],
    "skateboard": ["skateboard"],
    "surfboard": ["surfboard", "surf board", "longboard", "boogie board", "bodyboard"],
    "tennis racket": ["tennis racket", "racket", "racquet"],
    "bottle": ["bottle"],
    "wine glass": ["wine glass", "wineglass"],
    "cup": ["cup", "mug", "teacup", "coffee cup"],
    "fork": ["fork"],
    "knife": ["knife"],
    "spoon": ["spoon", "ladle"],
    "bowl": ["bowl", "container"],
    "banana": ["banana"],
    "apple": ["apple"],
    "sandwich": ["sandwich", "burger", "hamburger", "cheeseburger", "sub", "panini", "hoagie"],
    "orange": ["orange", "tangerine", "clementine"],
    "broccoli": ["broccoli"],
    "carrot": ["carrot"],
    "hot dog": ["hot dog", "hotdog", "frankfurter"],
    "pizza": ["pizza"],
    "donut": ["donut", "doughnut", "bagel"],
    "cake": ["cake", "cupcake", "cheesecake", "shortcake", "pancake"],
    "chair": ["chair", "seat", "stool", "armchair"],
    "couch": ["couch", "sofa", "loveseat", "settee", "futon", "recliner"],
    "potted plant": ["potted plant", "houseplant", "house plant"],
    "bed": ["bed"],
    "dining table": ["dining table", "table", "desk", "coffee table"],
    "toilet": ["toilet", "urinal", "commode", "potty"],
    "tv": ["tv", "television", "televison", "monitor"],
    "laptop": ["laptop", "laptop computer", "computer", "notebook", "netbook", "macbook"],
    "mouse": ["mouse"],
    "remote": ["remote", "remote control", "controller"],
    "keyboard": ["keyboard"],
    "cell phone": ["cell phone", "cellphone", "mobile phone", "phone", "telephone", "smartphone", "iphone"],
    "microwave": ["microwave"],
    "oven": ["oven", "stove", "stovetop"],
    "toaster": ["toaster"],
    "sink": ["sink"],
    "refrigerator": ["refrigerator", "fridge", "freezer"],
    "book": ["book", "novel", "textbook"],
    "clock": ["clock"],
    "vase": ["vase"],
    "scissors": ["scissors"],
    "teddy bear": ["teddy bear", "teddybear", "teddy"],
    "hair drier": ["hair drier", "hair dryer", "hairdryer", "hairdrier", "blow dryer", "blow drier"],
    "toothbrush": ["toothbrush"],
}

# Animals for which "baby X" / "adult X" means the animal X, not a person plus X.
_YOUNG_OR_ADULT_ANIMALS = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub",
)


def _coco_double_words() -> dict[str, str]:
    merges: dict[str, str] = {}
    for synonyms in COCO_SYNONYMS.values():  # every multi-word synonym is one token
        for synonym in synonyms:
            if " " in synonym:
                merges[synonym] = synonym
    for animal in _YOUNG_OR_ADULT_ANIMALS:
        merges[f"baby {animal}"] = animal
        merges[f"adult {animal}"] = animal
    merges.update({
        "passenger jet": "jet",
        "passenger train": "train",
        "bow tie": "tie",
        "toilet seat": "toilet",
        "home plate": "home plate",  # not an object; stops "plate" from firing a future plate-like class
        "train track": "train track",  # the track, not the train
        "computer mouse": "mouse",
        "computer monitor": "monitor",
        "computer keyboard": "keyboard",
    })
    return merges


COCO_DOUBLE_WORDS: dict[str, str] = _coco_double_words()
