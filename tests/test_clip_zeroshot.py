"""Zero-shot classification and retrieval: hand-built encoders with known answers, the normalise-average-normalise
order, chunking, the evaluation protocol (weights once per evaluation), open_clip parity, and refused inputs."""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evamim.clip.retrieval import caption_image_index, recall_at_k, retrieval_recall
from evamim.clip.templates import (IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES,
                                   check_template, folder_class_names, load_class_names, load_templates)
from evamim.clip.zeroshot import (ZeroShotEvaluation, classifier_weights, evaluate_zero_shot, finalize_zero_shot,
                                  zero_shot_scores, zero_shot_sums)

CLASSES = ["cat", "dog", "fox", "owl"]


def identity(texts):
    """A 'tokenizer' that hands the strings to the hand-built text encoders below."""
    return texts


def one_hot_text(texts: list[str]) -> torch.Tensor:
    """Each text -> the one-hot vector (E = 4) of the class named in it, scaled by the text length (the norm must
    not matter: the weights normalise every embedding)."""
    rows = [F.one_hot(torch.tensor(next(i for i, c in enumerate(CLASSES) if c in t)), 4).float() * len(t)
            for t in texts]
    return torch.stack(rows)


def hashed_text(texts: list[str], dim: int = 6) -> torch.Tensor:
    """Each text -> a fixed pseudo-random vector (seeded by its CRC), so every (class, template) pair differs."""
    return torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
                        for t in texts])


def reference_weights(encode_text, names, templates) -> torch.Tensor:
    """The definition, one class at a time: normalise each template's embedding, average, normalise; (E, K)."""
    columns = []
    for name in names:
        embeddings = F.normalize(encode_text([t.format(name) for t in templates]), dim=-1)
        columns.append(F.normalize(embeddings.mean(dim=0), dim=0))
    return torch.stack(columns, dim=1)


# ------------------------------------------------------------------------------------------ classifier weights
def test_weights_are_normalise_average_normalise_by_hand():
    # Class "cat": template 0 embeds to 10 * e0, template 1 to 1 * e1. Normalise each: e0, e1; average:
    # (0.5, 0.5); normalise: (1/sqrt 2, 1/sqrt 2). Skipping the first normalisation gives (0.995, 0.0995),
    # skipping the last gives (0.5, 0.5).
    def encode_text(texts):
        return torch.stack([torch.tensor([10.0, 0.0]) if t.startswith("big") else torch.tensor([0.0, 1.0])
                            for t in texts])

    weights = classifier_weights(encode_text, identity, ["cat"], ["big {}", "small {}"], device="cpu")
    assert weights.shape == (2, 1) and weights.dtype == torch.float32
    assert torch.allclose(weights[:, 0], torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-7)


def test_weights_non_orthogonal_templates_by_hand():
    # Templates at angles 0 and 90 degrees with norms 3 and 4 and a third at 0 degrees with norm 1:
    # unit vectors (1, 0), (0, 1), (1, 0) -> mean (2/3, 1/3) -> (2, 1) / sqrt 5.
    table = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.0, 4.0]), "c": torch.tensor([1.0, 0.0])}
    weights = classifier_weights(lambda texts: torch.stack([table[t[0]] for t in texts]), identity, ["x"],
                                 ["a {}", "b {}", "c {}"], device="cpu")
    assert torch.allclose(weights[:, 0], torch.tensor([2.0, 1.0]) / math.sqrt(5), atol=1e-7)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 1000])
def test_weights_match_the_definition_for_any_text_batch_size(batch_size):
    names, templates = ["cat", "dog", "fox"], ["a {}.", "the {}!", "my {}?", "one {}"]
    weights = classifier_weights(hashed_text, identity, names, templates, batch_size=batch_size, device="cpu")
    assert weights.shape == (6, 3)
    assert torch.allclose(weights, reference_weights(hashed_text, names, templates), atol=1e-6)
    assert torch.allclose(weights.norm(dim=0), torch.ones(3), atol=1e-6)


def test_weights_match_open_clip_build_zero_shot_classifier():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    torch.manual_seed(0)
    model = CLIP(embed_dim=8, vision_cfg=dict(layers=1, width=16, patch_size=8, image_size=16, head_width=8),
                 text_cfg=dict(context_length=16, vocab_size=49408, width=16, heads=2, layers=1)).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    names, templates = list(IMAGENET_CLASSNAMES[:7]), list(OPENAI_IMAGENET_TEMPLATES[:5])
    expected = build_zero_shot_classifier(model, tokenizer, names, templates, num_classes_per_batch=3)
    ours = classifier_weights(lambda tokens: model.encode_text(tokens, normalize=True), tokenizer, names, templates,
                              batch_size=4, device="cpu")
    assert ours.shape == expected.shape == (8, 7)
    assert torch.allclose(ours, expected, atol=1e-6)
    evaluation = ZeroShotEvaluation([], names, tokenizer, device="cpu", templates=templates, text_batch_size=11)
    assert torch.allclose(evaluation.prepare(model), expected, atol=1e-6)


def test_templates_and_class_names_are_open_clips():
    metadata = pytest.importorskip("open_clip.zero_shot_metadata")
    assert list(OPENAI_IMAGENET_TEMPLATES) == [t("{}") for t in metadata.OPENAI_IMAGENET_TEMPLATES]
    assert list(SIMPLE_IMAGENET_TEMPLATES) == [t("{}") for t in metadata.SIMPLE_IMAGENET_TEMPLATES]
    assert list(IMAGENET_CLASSNAMES) == list(metadata.IMAGENET_CLASSNAMES)
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 and len(IMAGENET_CLASSNAMES) == 1000


# ------------------------------------------------------------------------------------------ image side
def test_zero_shot_picks_the_class_of_noisy_images():
    torch.manual_seed(0)
    weights = classifier_weights(one_hot_text, identity, CLASSES, ["a photo of a {}.", "a {}"], device="cpu")
    assert torch.allclose(weights, torch.eye(4))  # one-hot per class whatever the template
    labels = torch.arange(12) % 4
    images = F.one_hot(labels, 4).float() * 3 + 0.3 * torch.randn(12, 4)  # the class's vector plus noise
    wrong = labels.clone()
    wrong[:3] = (labels[:3] + 1) % 4  # three images labelled as another class: 9 / 12 right
    loader = [{"images": images[:5], "labels": wrong[:5]}, (images[5:], wrong[5:])]
    assert evaluate_zero_shot(lambda x: x, weights, loader, "cpu") == {"zeroshot_top1": 75.0, "zeroshot_top5": 100.0}


def test_top5_counts_the_five_best_classes():
    weights = torch.eye(7)
    # Class scores of one image, best first: 3, 0, 6, 1, 5, 2, 4.
    image = torch.tensor([[0.9, 0.7, 0.2, 1.0, 0.1, 0.5, 0.8]])
    cases = {3: (1, 1), 6: (0, 1), 5: (0, 1), 2: (0, 0), 4: (0, 0)}
    for label, (top1, top5) in cases.items():
        sums = zero_shot_sums(image, weights, torch.tensor([label]))
        assert (float(sums["zeroshot_top1"]), float(sums["zeroshot_top5"])) == (top1, top5), label
        assert sums["zeroshot_top1"].dtype == torch.float64


def test_top5_with_fewer_than_five_classes_counts_every_class():
    weights = torch.eye(3)
    images = torch.tensor([[0.1, 0.2, 0.9], [0.9, 0.2, 0.1]])
    sums = zero_shot_sums(images, weights, torch.tensor([0, 0]))  # worst-ranked, then best-ranked
    assert finalize_zero_shot(sums) == {"zeroshot_top1": 50.0, "zeroshot_top5": 100.0}


def test_sums_of_two_processes_give_the_one_process_result():
    torch.manual_seed(1)
    weights = F.normalize(torch.randn(6, 9), dim=0)
    images, labels = torch.randn(40, 6), torch.randint(0, 9, (40,))
    batches = [{"images": images[i:i + 8], "labels": labels[i:i + 8]} for i in range(0, 40, 8)]
    first, second = (zero_shot_scores(lambda x: x, weights, share, "cpu") for share in (batches[:2], batches[2:]))
    added = {name: first[name] + second[name] for name in first}
    assert finalize_zero_shot(added) == evaluate_zero_shot(lambda x: x, weights, batches, "cpu")
    empty = zero_shot_scores(lambda x: x, weights, [], "cpu")  # a process without a batch adds zeros
    assert {name: float(value) for name, value in empty.items()} == dict.fromkeys(empty, 0.0)


# ------------------------------------------------------------------------------------------ the evaluation object
class ToyClip(nn.Module):
    """encode_text: the one-hot vector of the class named in each text, through a learnable (4, 4) map;
    encode_image: identity. Counts text calls."""

    def __init__(self):
        super().__init__()
        self.text_map = nn.Parameter(torch.eye(4))
        self.text_calls = 0

    def encode_text(self, texts, normalize: bool = False):
        self.text_calls += 1
        out = one_hot_text(texts) @ self.text_map
        return F.normalize(out, dim=-1) if normalize else out

    def encode_image(self, images, normalize: bool = False):
        return F.normalize(images, dim=-1) if normalize else images


def test_evaluation_computes_weights_once_per_evaluation_and_follows_the_model():
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    images = F.one_hot(labels, 4).float()
    loader = [{"images": images[:4], "labels": labels[:4]}, {"images": images[4:], "labels": labels[4:]}]
    evaluation = ZeroShotEvaluation(loader, CLASSES, identity, device="cpu", templates=["a {}", "the {}"],
                                    text_batch_size=3)
    model = ToyClip()

    def run() -> dict[str, float]:  # what the runner does: sum the scores of every batch, then finalize
        sums: dict[str, torch.Tensor] = {}
        for batch in evaluation.loader:
            for name, value in evaluation.score(model, batch).items():
                sums[name] = sums.get(name, 0) + value
        return evaluation.finalize(sums)

    assert run() == {"zeroshot_top1": 100.0, "zeroshot_top5": 100.0}
    assert model.text_calls == 3  # 4 classes x 2 templates in batches of 3, once for both batches
    assert evaluation.weights is None  # forgotten: the next evaluation sees the model's new text weights
    with torch.no_grad():
        model.text_map.copy_(torch.eye(4)[[1, 2, 3, 0]])  # training moved every class's text to the next axis
    assert run()["zeroshot_top1"] == 0.0
    assert model.text_calls == 6


def test_evaluation_uses_prepared_weights():
    model = ToyClip()
    evaluation = ZeroShotEvaluation([], CLASSES, identity, device="cpu", templates=["a {}"])
    weights = evaluation.prepare(model)
    assert torch.allclose(weights, torch.eye(4)) and model.text_calls == 1
    evaluation.score(model, (torch.eye(4), torch.arange(4)))
    assert model.text_calls == 1


# ------------------------------------------------------------------------------------------ names and files
def test_folder_class_names(tmp_path):
    folders = ["n02", "n01x"]
    assert folder_class_names(folders) == ["n02", "n01x"]
    assert folder_class_names(folders, {"n01x": "fox", "n02": "owl", "n99": "unused"}) == ["owl", "fox"]
    assert folder_class_names(folders, ["owl", "fox"]) == ["owl", "fox"]
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"n02": "owl", "n01x": "fox"}))
    assert folder_class_names(folders, names) == ["owl", "fox"]
    with pytest.raises(ValueError, match=r"1 class folder\(s\) missing from the class names in .*names.json: 'n03'"):
        folder_class_names(["n02", "n03"], str(names))
    with pytest.raises(ValueError, match="3 class names for 2 class folders"):
        folder_class_names(folders, ["a", "b", "c"])


def test_load_class_names(tmp_path):
    text = tmp_path / "names.txt"
    text.write_text("tench\n  great white shark \n\n")
    assert load_class_names(text) == ["tench", "great white shark"]
    listed = tmp_path / "names.json"
    listed.write_text('["tench", "goldfish"]')
    assert load_class_names(listed) == ["tench", "goldfish"]
    text.write_text("tench\n\ngoldfish\n")
    with pytest.raises(ValueError, match=r"names.txt:2 is blank"):
        load_class_names(text)
    listed.write_text('{"n01": ""}')
    with pytest.raises(ValueError, match="the name of folder 'n01' is ''"):
        load_class_names(listed)
    listed.write_text('"tench"')
    with pytest.raises(ValueError, match="holds a JSON str"):
        load_class_names(listed)
    with pytest.raises(FileNotFoundError, match="class names file .*missing.txt does not exist"):
        load_class_names(tmp_path / "missing.txt")


def test_load_templates(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("# prompts\na photo of a {}.\n\n  a {{curly}} {} \n")
    templates = load_templates(path)
    assert templates == ("a photo of a {}.", "a {{curly}} {}")
    assert templates[1].format("cat") == "a {curly} cat"
    path.write_text("a photo of a {}.\na photo\n")
    with pytest.raises(ValueError, match=r"templates.txt:2: template 'a photo' must contain the class-name"):
        load_templates(path)
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no template"):
        load_templates(path)


@pytest.mark.parametrize("template", ["a photo", "a {} of a {}", "a {c}", "a {0}", "a {:>5}", "a {!r}", "a { {}"])
def test_templates_without_exactly_one_plain_placeholder_are_refused(template):
    with pytest.raises(ValueError, match="template"):
        check_template(template)


@pytest.mark.parametrize("class_names, templates, message", [
    ([], ["a {}"], "the class name list is empty"),
    ("cat", ["a {}"], "class_names is the single string 'cat'"),
    (["cat", " "], ["a {}"], "class name 1 is ' '"),
    (["cat"], [], "the template list is empty"),
    (["cat"], "a {}", "templates is the single string"),
    (["cat"], ["a {}", "a photo"], "template 1 'a photo' must contain the class-name placeholder"),
])
def test_bad_class_names_and_templates_are_refused(class_names, templates, message):
    with pytest.raises(ValueError, match=message):
        classifier_weights(one_hot_text, identity, class_names, templates, device="cpu")
    with pytest.raises(ValueError, match=message):
        ZeroShotEvaluation([], class_names, identity, device="cpu", templates=templates)


def test_bad_encoders_batches_and_labels_are_refused():
    with pytest.raises(ValueError, match=r"encode_text returned \(1, 4\) for 2 texts"):
        classifier_weights(lambda texts: torch.ones(1, 4), identity, ["cat"], ["a {}", "b {}"], device="cpu")
    with pytest.raises(ValueError, match="non-finite embeddings for class 0 \\('cat'\\)"):
        classifier_weights(lambda texts: torch.full((len(texts), 2), float("nan")), identity, ["cat"], ["a {}"],
                           device="cpu")
    with pytest.raises(ValueError, match="batch_size is 0"):
        classifier_weights(one_hot_text, identity, CLASSES, ["a {}"], batch_size=0, device="cpu")
    with pytest.raises(ValueError, match="label 4 is out of range for 4 classes"):
        zero_shot_sums(torch.eye(4), torch.eye(4), torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match=r"image embeddings \(4, 3\) do not match classifier weights \(4, 4\)"):
        zero_shot_sums(torch.ones(4, 3), torch.eye(4), torch.arange(4))
    with pytest.raises(ValueError, match=r"needs 'images' and 'labels'; this one has \['images'\]"):
        evaluate_zero_shot(lambda x: x, torch.eye(4), [{"images": torch.eye(4)}], "cpu")
    with pytest.raises(RuntimeError, match="yielded no images"):
        evaluate_zero_shot(lambda x: x, torch.eye(4), [], "cpu")


# ------------------------------------------------------------------------------------------ retrieval
def test_recall_on_a_matrix_with_known_ranks():
    # Rows are images, columns captions; caption i belongs to image i (the diagonal).
    # Image -> text: image 0's caption is its 1st, image 1's its 2nd, image 2's its 3rd.
    # Text -> image: caption 0's image is its 3rd (column 0), caption 1's its 2nd, caption 2's its 1st.
    # Both ways R@1/2/3 = 1/3, 2/3, 1 (a bug mixing up rows and columns or counting the query itself moves them).
    similarity = torch.tensor([[0.6, 0.5, 0.0],
                               [0.9, 0.6, 0.2],
                               [0.8, 0.7, 0.3]])
    assert [similarity[i].argsort(descending=True).tolist().index(i) for i in range(3)] == [0, 1, 2]
    assert [similarity[:, i].argsort(descending=True).tolist().index(i) for i in range(3)] == [2, 1, 0]
    recalls = recall_at_k(similarity, ks=(1, 2, 3))
    expected = [100 / 3, 200 / 3, 100.0]
    assert [recalls[f"image_to_text_R@{k}"] for k in (1, 2, 3)] == pytest.approx(expected)
    assert [recalls[f"text_to_image_R@{k}"] for k in (1, 2, 3)] == pytest.approx(expected)
    # Caption 1 now tops both image 1's row and its own column: both R@1 rise to 2/3.
    similarity[1, 1] = 1.0
    recalls = recall_at_k(similarity, ks=(1,))
    assert recalls["image_to_text_R@1"] == pytest.approx(200 / 3)
    assert recalls["text_to_image_R@1"] == pytest.approx(200 / 3)


def test_recall_with_several_captions_per_image():
    # 2 images, 4 captions: captions 0, 1 describe image 0; captions 2, 3 image 1.
    similarity = torch.tensor([[0.1, 0.8, 0.9, 0.0],    # image 0: best caption is 2 (wrong), caption 1 is 2nd
                               [0.5, 0.4, 0.6, 0.7]])   # image 1: caption 3 is 1st
    text_image = torch.tensor([0, 0, 1, 1])
    recalls = recall_at_k(similarity, text_image, ks=(1, 2))
    assert recalls["image_to_text_R@1"] == 50.0 and recalls["image_to_text_R@2"] == 100.0
    # Captions: 0 -> image 1 scores higher (0.5 > 0.1): miss at 1; 1 -> hit; 2 -> miss (0.6 < 0.9); 3 -> hit.
    assert recalls["text_to_image_R@1"] == 50.0 and recalls["text_to_image_R@2"] == 100.0


def test_ties_count_against_the_query():
    recalls = recall_at_k(torch.ones(4, 4), ks=(1, 4))
    assert recalls == {"image_to_text_R@1": 0.0, "image_to_text_R@4": 100.0,
                       "text_to_image_R@1": 0.0, "text_to_image_R@4": 100.0}


def test_chunked_recall_from_embeddings_matches_sorting():
    torch.manual_seed(2)
    images, texts = torch.randn(9, 5), torch.randn(20, 5)
    text_image = torch.randint(0, 9, (20,))
    text_image[:9] = torch.arange(9)  # every image captioned
    recalls = retrieval_recall(images, texts, text_image, ks=(1, 3, 5), chunk_size=4)
    similarity = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).t()
    for k in (1, 3, 5):  # the definition, by sorting
        i2t = [bool((text_image[similarity[i].argsort(descending=True)[:k]] == i).any()) for i in range(9)]
        t2i = [int(text_image[t]) in similarity[:, t].argsort(descending=True)[:k].tolist() for t in range(20)]
        assert recalls[f"image_to_text_R@{k}"] == pytest.approx(100 * sum(i2t) / 9)
        assert recalls[f"text_to_image_R@{k}"] == pytest.approx(100 * sum(t2i) / 20)
    assert recalls == retrieval_recall(images, texts, text_image, ks=(1, 3, 5), chunk_size=1000)


def test_caption_image_index():
    ids, index = caption_image_index(["b.jpg", "a.jpg", "b.jpg", "c.jpg"])
    assert ids == ["b.jpg", "a.jpg", "c.jpg"] and index.tolist() == [0, 1, 0, 2]


@pytest.mark.parametrize("similarity, text_image, ks, message", [
    (torch.ones(2, 3), None, (1,), "2 images and 3 captions without text_image"),
    (torch.ones(3, 3), torch.tensor([0, 0, 1]), (1,), "image 2 has no caption"),
    (torch.ones(2, 2), torch.tensor([0, 2]), (1,), r"text_image holds rows outside \[0, 2\)"),
    (torch.ones(2, 2), torch.tensor([0.0, 1.0]), (1,), "expected \\(2,\\) integers"),
    (torch.ones(2, 2), None, (0, 5), "ks is \\(0, 5\\)"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), None, (1,), "NaN or infinite"),
    (torch.ones(3), None, (1,), "expected a non-empty 2-D tensor"),
])
def test_bad_retrieval_inputs_are_refused(similarity, text_image, ks, message):
    with pytest.raises(ValueError, match=message):
        recall_at_k(similarity, text_image, ks)
