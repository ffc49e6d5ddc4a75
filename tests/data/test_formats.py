"""mllm.data.formats: the same conversations in every accepted format give bit-identical training batches;
detection, the flag, and the errors for records that fit no format."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mllm.data.collate import SupervisedCollator
from mllm.data.formats import DataFormatError, layout_of, read_conversations, read_preference_pairs
from mllm.data.preference_dataset import PreferenceCollator, PreferenceDataset, pair_key
from mllm.data.sft_dataset import SupervisedDataset
from mllm.model.configuration import MLLMConfig
from mllm.model.loading import SHIPPED_MODEL
from mllm.model.tokenization import load_tokenizer

HAS_DATASETS = importlib.util.find_spec("datasets") is not None and importlib.util.find_spec("pyarrow") is not None
needs_datasets = pytest.mark.skipif(not HAS_DATASETS, reason="`datasets` / `pyarrow` not installed (pins: "
                                                             "datasets, pyarrow in requirements.lock)")
Q = "Is there a red circle in the image? Please answer yes or no."
SYSTEM = "You are a careful assistant."


@pytest.fixture(scope="module")
def model():
    # the tiny preset, not the shipped model's own config: that reads one view (no slices), and these tests
    # check that every format carries an image's slices along in order
    return load_tokenizer(SHIPPED_MODEL), MLLMConfig.from_preset("tiny")


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(tmp_path / "img" / "small.png")
    wide = Image.new("RGB", (700, 300), (20, 90, 200))
    wide.paste((250, 250, 0), (100, 100, 300, 200))
    wide.save(tmp_path / "img" / "wide.png")
    return tmp_path


# The same four conversations: one image; multi-turn with an image; a system prompt (text only); two images.
MINICPMV = [
    {"id": "a", "image": "img/small.png", "conversations": [
        {"role": "user", "content": f"<image>\n{Q}"}, {"role": "assistant", "content": "Yes"}]},
    {"id": "b", "image": "img/wide.png", "conversations": [
        {"role": "user", "content": "<image>\nHow many objects are there?"},
        {"role": "assistant", "content": "There is 1 object."},
        {"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": "Yellow."}]},
    {"id": "c", "conversations": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello."}]},
    {"id": "d", "image": {"<image_00>": "img/small.png", "<image_01>": "img/wide.png"}, "conversations": [
        {"role": "user", "content": "<image_00>\nCompare it with <image_01>. Which one is wider?"},
        {"role": "assistant", "content": "The second."}]},
]
LLAVA_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}
IMAGES = [["img/small.png"], ["img/wide.png"], [], ["img/small.png", "img/wide.png"]]


def as_generic_text(text: str) -> str:
    """<image_00>, <image_01> -> <image> (the llava / sharegpt placeholders, matched in order)."""
    return text.replace("<image_00>", "<image>").replace("<image_01>", "<image>")


def llava_records():
    out = []
    for r, images in zip(MINICPMV, IMAGES):
        rec = {"id": r["id"], "conversations": [{"from": LLAVA_ROLE[m["role"]], "value": as_generic_text(m["content"])}
                                                for m in r["conversations"]]}
        if images:
            rec["image"] = images[0] if len(images) == 1 else images
        out.append(rec)
    return out


def sharegpt_records(images_of=lambda paths: paths):
    out = []
    for r, images in zip(MINICPMV, IMAGES):
        messages = [{"role": m["role"], "content": as_generic_text(m["content"])} for m in r["conversations"]]
        if r["id"] == "b":  # content as parts: [image, text] reads "<image>\n" + text
            messages[0]["content"] = [{"type": "image"}, {"type": "text", "text": "How many objects are there?"}]
        out.append({"id": r["id"], "messages": messages, "images": images_of(images)})
    return out


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def batch_of(path, model, folder, **kwargs) -> dict:
    tokenizer, config = model
    ds = SupervisedDataset.from_config(path, tokenizer, config, folder, image_cache=folder / "cache", **kwargs)
    assert len(ds) == len(MINICPMV), ds.summary()
    return SupervisedCollator(pad_id=tokenizer.pad_token_id or 0)([ds[i] for i in range(len(ds))])


def assert_same(a, b, where=""):
    """Every tensor equal with torch.equal (dtype and shape included), recursively through lists / dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def hf_dataset(rows, features):
    """A datasets.Dataset of `rows`, built with a fixed fingerprint: datasets 5.2's fingerprinting fails to
    pickle pyarrow's MonthDayNano type in some environments, and these tests are about reading, not hashing."""
    import datasets
    import pyarrow

    table = pyarrow.Table.from_pylist([features.encode_example(r) for r in rows], schema=features.arrow_schema)
    return datasets.Dataset(datasets.table.InMemoryTable(table), info=datasets.DatasetInfo(features=features),
                            fingerprint="test-formats")


def png_bytes(folder, relative):
    return {"bytes": (folder / relative).read_bytes(), "path": Path(relative).name}


def test_every_format_gives_the_same_batch(folder, model):
    reference = batch_of(write_json(folder / "own.json", MINICPMV), model, folder)
    assert len(reference["pixel_values"][3]) > 2  # the wide image is sliced: slices ride along in order
    for path, name in [(write_jsonl(folder / "own.jsonl", MINICPMV), "minicpmv"),
                       (write_json(folder / "llava.json", llava_records()), "llava"),
                       (write_jsonl(folder / "llava.jsonl", llava_records()), "llava"),
                       (write_json(folder / "sharegpt.json", sharegpt_records()), "sharegpt")]:
        assert read_conversations(path)[1] == name
        assert_same(reference, batch_of(path, model, folder), path.name)


@needs_datasets
def test_hf_datasets_folder_and_parquet_give_the_same_batch(folder, model):
    import datasets

    reference = batch_of(write_json(folder / "own.json", MINICPMV), model, folder)
    rows = sharegpt_records(lambda paths: [png_bytes(folder, p) for p in paths])
    features = datasets.Features({"id": datasets.Value("string"), "images": datasets.List(datasets.Image()),
                                  "messages": datasets.List({"role": datasets.Value("string"),
                                                             "content": datasets.Value("string")})})
    for r in rows:  # arrow columns have one type: parts become their joined text here
        r["messages"] = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                          else "<image>\nHow many objects are there?"} for m in r["messages"]]
    hf_dataset(rows, features).save_to_disk(str(folder / "hf_sharegpt"))
    llava = llava_records()
    for r, images in zip(llava, IMAGES):  # LLaMA-Factory's flavour: "images" beside from/value turns
        r.pop("image", None)
        r["images"] = [png_bytes(folder, p) for p in images]
    llava_features = datasets.Features({"id": datasets.Value("string"), "images": datasets.List(datasets.Image()),
                                        "conversations": datasets.List({"from": datasets.Value("string"),
                                                                        "value": datasets.Value("string")})})
    hf_dataset(llava, llava_features).to_parquet(str(folder / "llava.parquet"))
    for path, name in [(folder / "hf_sharegpt", "hf/sharegpt"), (folder / "llava.parquet", "hf/llava")]:
        records, detected = read_conversations(path, image_cache=folder / "cache")
        assert detected == name
        assert all(Path(p).is_absolute() and Path(p).parent == folder / "cache"
                   for p in records[3]["image"].values())  # bytes written once to the cache, content-named
        assert_same(reference, batch_of(path, model, folder, data_format="hf"), path.name)


def test_detection_and_the_format_line(folder, model):
    assert [layout_of(r) for r in (MINICPMV[0], llava_records()[0], sharegpt_records()[0], {"question": 1})] == \
        ["minicpmv", "llava", "sharegpt", None]
    path = write_json(folder / "llava.json", llava_records())
    tokenizer, config = model
    ds = SupervisedDataset.from_config(path, tokenizer, config, folder)
    assert ds.format_line().startswith("data: 4 records, format llava (detected)")
    ds = SupervisedDataset.from_config(path, tokenizer, config, folder, data_format="llava")
    assert "format llava (given)" in ds.format_line()
    # JSON lines inside a .json file are read too
    assert read_conversations(write_jsonl(folder / "lines.json", MINICPMV))[1] == "minicpmv"


def test_a_record_that_fits_no_format_names_file_record_line_and_formats(folder):
    records = MINICPMV[:2] + [{"question": "What?", "answer": "That."}]
    with pytest.raises(DataFormatError) as err:
        read_conversations(write_jsonl(folder / "odd.jsonl", records))
    message = str(err.value)
    assert "odd.jsonl" in message and "record 2 (line 3)" in message and "['answer', 'question']" in message
    for name in ("minicpmv", "llava", "sharegpt", "hf", '"from": "human"', '"messages"'):
        assert name in message


def test_mixed_formats_and_a_wrong_flag_are_refused(folder):
    with pytest.raises(DataFormatError, match=r"mixed formats: record 1 is sharegpt .* record 0 is minicpmv"):
        read_conversations(write_json(folder / "mixed.json", [MINICPMV[0], sharegpt_records()[1]]))
    # minicpmv and llava differ only in their turns' keys: one file may mix them (read turn by turn)
    records, _ = read_conversations(write_json(folder / "both.json", [MINICPMV[0], llava_records()[1]]))
    assert len(records) == 2
    with pytest.raises(DataFormatError, match="--data_format llava, but record 0 is sharegpt"):
        read_conversations(write_json(folder / "s.json", sharegpt_records()), "llava")
    with pytest.raises(DataFormatError, match="needs a datasets save_to_disk folder"):
        read_conversations(folder / "s.json", "hf")
    bad = sharegpt_records()
    bad[3]["images"] = ["img/small.png"]  # two placeholders, one image
    with pytest.raises(DataFormatError, match=r"record 3 \(sharegpt\): 1 images for 2 '<image>' placeholders"):
        read_conversations(write_json(folder / "bad.json", bad))


def test_data_format_is_a_flag_of_the_training_verbs(tmp_path):
    from mllm.cli.train_sft import parse_args
    from mllm.cli.training_options import parse_training_options
    from mllm.train import grounding
    from mllm.train.sft import ModelArguments

    _, data_args, _ = parse_args(["--model_name_or_path", "m", "--data_path", "d.json", "--data_format", "sharegpt",
                                  "--output_dir", str(tmp_path)])
    assert data_args.data_format == "sharegpt"
    with pytest.raises(SystemExit):
        parse_args(["--model_name_or_path", "m", "--data_path", "d", "--data_format", "alpaca"])
    types = (ModelArguments, grounding.GroundingDataArguments, grounding.GroundingTrainingArguments)
    assert parse_training_options(types, ["--model_name_or_path", "m", "--data_path", "d", "--data_format", "llava",
                                          "--output_dir", str(tmp_path)], "train grounding")[1].data_format == "llava"


# ---- preference --------------------------------------------------------------------------------------------------

PAIRS = [{"idx": 0, "question": "Describe the image.", "chosen": "A red square.", "rejected": "A blue cat.",
          "image_path": "img/small.png"},
         {"idx": 1, "question": "What is in the image?", "chosen": "A yellow box on blue.", "rejected": "Nothing.",
          "image_path": "img/wide.png"}]


def preference_items(path, model, folder):
    tokenizer, config = model
    ds = PreferenceDataset.from_config(path, tokenizer, config, folder, image_cache=folder / "cache")
    items = [ds[i] for i in range(len(ds))]
    for item in items:
        item["idx"] = pair_key(item["idx"])  # RLAIF-V's idx is a string
    return ds.format_name, items, PreferenceCollator()(items)


def test_preference_pairs_as_json_lines(folder, model):
    name, items, batch = preference_items(write_json(folder / "pairs.json", PAIRS), model, folder)
    assert name == "pairs"
    assert_same((items, batch), preference_items(write_jsonl(folder / "pairs.jsonl", PAIRS), model, folder)[1:])


@needs_datasets
def test_rlaifv_parquet_gives_the_same_preference_items(folder, model):
    import datasets

    rows = [{"ds_name": "test", "image": png_bytes(folder, p["image_path"]), "question": p["question"],
             "chosen": p["chosen"], "rejected": p["rejected"], "origin_dataset": "made-up", "origin_split": "{}",
             "idx": str(p["idx"]), "image_path": f"somewhere/{p['image_path']}"} for p in PAIRS]
    features = datasets.Features({k: datasets.Image() if k == "image" else datasets.Value("string") for k in rows[0]})
    hf_dataset(rows, features).to_parquet(str(folder / "rlaifv.parquet"))
    pairs, name = read_preference_pairs(folder / "rlaifv.parquet", folder / "cache")
    assert name == "hf/rlaif-v" and pairs[1]["metainfos"]["origin_dataset"] == "made-up"
    expected = preference_items(write_json(folder / "pairs.json", PAIRS), model, folder)[1:]
    assert_same(expected, preference_items(folder / "rlaifv.parquet", model, folder)[1:])
