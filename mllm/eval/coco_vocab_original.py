"""The original CHAIR vocabulary (Rohrbach et al., 2018), kept as data: the metric's definition, word for word.

Source: LisaAnne/Hallucination at commit 6e4d33c, `data/synonyms.txt` (80 lines, 3577 bytes, sha256 pinned in
`SYNONYMS_TXT_SHA256`) and the hard-coded rules of `utils/chair.py` (`CHAIR.__init__`). Maxlinn's Python-3 port
(CHAIR-metric-standalone, which the THUNLP exercise copies) embeds the same 80 lines and the same rules.

How the original reads the file (and `ORIGINAL_SYNONYMS` below does too): each line is `strip()`ped and split on
", "; the first entry is the line's node word (the COCO category name as in `instances_*.json`, COCO category
order), every entry maps to it. 80 lines hold 416 entries, 403 distinct; no entry is on two lines.
Quirks kept on purpose, because published CHAIR numbers include them:
- "motorcycle, scooter,  motor bike" and "cake,  cheesecake" have two spaces, so the entries are " motor bike" and
  " cheesecake" with a leading space: no caption token ever equals them (motor bike / cheesecake never count).
- "iPhone" is capitalised while captions are lowercased: it never matches.
- Entries repeat inside a line (person: person, woman, guy, child, gentleman; bicycle: bicycle, bike; airplane:
  jetliner; motorcycle: scooter; sheep: lamb; cow: cattle; toilet: toilet; refrigerator: fridge): harmless.
- "bison " and "chesterfield " end in a space that `strip()` removes; "knive" and "phon" are spellings that
  pattern's singularize produces; plurals such as "skis", "oxen", "children", "people" sit next to their singulars.
- Multi-word entries merge only through `ORIGINAL_DOUBLE_WORDS`, and only as pairs of adjacent tokens: "dining
  table" is read as "dining" + "table" (table -> dining table), and the three-word "stove top oven" never merges.
"""

from __future__ import annotations

import hashlib

# data/synonyms.txt, one string per line (long lines are split only where the file has ", "; trailing spaces kept)
SYNONYMS_TXT_LINES: tuple[str, ...] = (
    ("person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, "
     "worker, passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, "
     "female, guy, traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, "
     "skateboarder, person, woman, guy, foreigner, child, gentleman, caller, offender, coworker, "
     "trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, "
     "bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager"),
    "bicycle, bike, bicycle, bike, unicycle, minibike, trike",
    "car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi",
    "motorcycle, scooter,  motor bike, motor cycle, motorbike, scooter, moped",
    "airplane, jetliner, plane, air plane, monoplane, aircraft, jet, jetliner, airbus, biplane, seaplane",
    "bus, minibus, trolley",
    "train, locomotive, tramway, caboose",
    "truck, pickup, lorry, hauler, firetruck",
    ("boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, "
     "catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, "
     "barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, "
     "steamship"),
    "traffic light, street light, traffic signal, stop light, streetlight, stoplight",
    "fire hydrant, hydrant",
    "stop sign",
    "parking meter",
    "bench, pew",
    ("bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, "
     "hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, "
     "woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, "
     "flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, raven, "
     "turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, condor, "
     "macaw, peafowl, cockatoo, songbird"),
    "cat, kitten, feline, tabby",
    ("dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, "
     "terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, "
     "corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky"),
    ("horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, "
     "bronco"),
    "sheep, lamb, ram, lamb, goat, ewe",
    "cow, cattle, oxen, ox, calf, cattle, holstein, heifer, buffalo, bull, zebu, bison ",
    "elephant",
    "bear, panda",
    "zebra",
    "giraffe",
    "backpack, knapsack",
    "umbrella",
    "handbag, wallet, purse, briefcase",
    "tie, bow, bow tie",
    "suitcase, suit case, luggage",
    "frisbee",
    "skis, ski",
    "snowboard",
    "sports ball, ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard, longboard, skimboard, shortboard, wakeboard",
    "tennis racket, racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife, pocketknife, knive",
    "spoon",
    "bowl, container",
    "banana",
    "apple",
    "sandwich, burger, sub, cheeseburger, hamburger",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut, doughnut, bagel",
    "cake,  cheesecake, cupcake, shortcake, coffeecake, pancake",
    "chair, seat, stool",
    "couch, sofa, recliner, futon, loveseat, settee, chesterfield ",
    "potted plant, houseplant",
    "bed",
    "dining table, table, desk",
    "toilet, urinal, commode, toilet, lavatory, potty",
    "tv, monitor, televison, television",
    "laptop, computer, notebook, netbook, lenovo, macbook, laptop computer",
    "mouse",
    "remote",
    "keyboard",
    "cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iPhone",
    "microwave",
    "oven, stovetop, stove, stove top oven",
    "toaster",
    "sink",
    "refrigerator, fridge, fridge, freezer",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear, teddybear",
    "hair drier, hairdryer",
    "toothbrush",
)
SYNONYMS_TXT = "\n".join(SYNONYMS_TXT_LINES) + "\n"
SYNONYMS_TXT_SHA256 = "b685537b36fe21b791c87151b96a991ceb582edff19f3da204dcc7a7905502f2"

# node word (first entry of the line) -> the line's entries as the original splits them, duplicates included
ORIGINAL_SYNONYMS: dict[str, list[str]] = {
    entries[0]: entries for entries in (line.strip().split(", ") for line in SYNONYMS_TXT_LINES)
}

# Part 1: COCO "double words" that stand for themselves (the original lists "hot dog" and "teddy bear" twice;
# "home plate" and "train track" are no COCO objects: merging them keeps "plate"/"train" from firing).
COCO_DOUBLE_WORDS_LIST: tuple[str, ...] = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "hot dog", "teddy bear", "home plate",
    "train track",
)
# Part 2: "baby X" / "adult X" -> X, so "baby" / "adult" do not fire "person".
ANIMAL_WORDS: tuple[str, ...] = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub",
)
# Part 3: "passenger X" -> X, so "passenger" does not fire "person".
VEHICLE_WORDS: tuple[str, ...] = ("jet", "train")
# Part 4: overrides, applied last ("wine glas" is pattern's singular of "wine glass").
DOUBLE_WORD_OVERRIDES: dict[str, str] = {"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"}


def _original_double_words() -> dict[str, str]:
    merges = {phrase: phrase for phrase in COCO_DOUBLE_WORDS_LIST}
    for animal in ANIMAL_WORDS:
        merges[f"baby {animal}"] = animal
        merges[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        merges[f"passenger {vehicle}"] = vehicle
    merges.update(DOUBLE_WORD_OVERRIDES)
    return merges


ORIGINAL_DOUBLE_WORDS: dict[str, str] = _original_double_words()  # 55 keys, as in the original's double_word_dict


def synonyms_txt_sha256() -> str:
    """sha256 of `SYNONYMS_TXT`: equals `SYNONYMS_TXT_SHA256` when the embedded file is byte-exact."""
    return hashlib.sha256(SYNONYMS_TXT.encode()).hexdigest()
