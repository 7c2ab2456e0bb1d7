"""A CLIP judge of rendered images (zero-shot: "This is a photo of {class}.") and its metrics."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from a2v_flower.models.text_encoders import CLIP_SEQ_LEN, tiny_clip_tokenizer


def classification_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over true classes) and macro F1 (over true or predicted classes)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    recall = [np.mean(preds[labels == c] == c) for c in np.unique(labels)]
    f1 = []
    for c in np.union1d(labels, preds):
        tp = np.sum((preds == c) & (labels == c))
        f1.append(2 * tp / (np.sum(preds == c) + np.sum(labels == c)))
    return {"accuracy": float(np.mean(preds == labels)), "balanced_accuracy": float(np.mean(recall)),
            "macro_f1": float(np.mean(f1))}


class ImageJudge:
    """CLIP zero-shot classifier of rendered images: "This is a photo of {class}."."""

    def __init__(self, model: CLIPModel, processor: CLIPProcessor, device: torch.device | str = "cpu"):
        self.model, self.processor, self.device = model.eval().to(device), processor, torch.device(device)

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: torch.device | str = "cpu") -> ImageJudge:
        """A real CLIP from a hub id or local folder."""
        return cls(CLIPModel.from_pretrained(name_or_path), CLIPProcessor.from_pretrained(name_or_path), device)

    @classmethod
    def tiny(cls, seed: int = 0, image_size: int = 32, patch_size: int = 8,
             device: torch.device | str = "cpu") -> ImageJudge:
        """A random 32-d, 1-layer CLIP with the offline character tokenizer (for tests)."""
        tok = tiny_clip_tokenizer()
        tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        config = CLIPConfig(projection_dim=32, vision_config=dict(**tower, image_size=image_size, patch_size=patch_size),
                         text_config=dict(**tower, vocab_size=len(tok), max_position_embeddings=CLIP_SEQ_LEN,
                                          bos_token_id=0, eos_token_id=1, pad_token_id=1))
        torch.manual_seed(seed)
        images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size})
        return cls(CLIPModel(config), CLIPProcessor(image_processor=images, tokenizer=tok), device)

    @torch.no_grad()
    def scores(self, images: list[Image.Image], class_names: list[str]) -> torch.Tensor:
        """(N, C) cosine of each image with each class prompt; the judge predicts the argmax."""
        prompts = [f"This is a photo of {name.replace('_', ' ')}." for name in class_names]
        text = self.processor.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        pixels = self.processor.image_processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        txt = torch.nn.functional.normalize(self.model.get_text_features(**text).pooler_output, dim=-1)  # (C, P)
        img = torch.nn.functional.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output,
                                            dim=-1)                                                   # (N, P)
        return (img @ txt.T).float().cpu()                                                           # (N, C)

    def judge(self, images: list[Image.Image], labels: list[int], class_names: list[str]) -> dict[str, float]:
        """Zero-shot accuracy, balanced accuracy, macro F1 and CLIP score of `images` against their labels."""
        return judge_metrics(self.scores(images, class_names), labels)


def judge_metrics(cos: torch.Tensor, labels: list[int]) -> dict[str, float]:
    """Classification metrics of the judge's (N, C) scores, and the CLIP score (100 x cosine) of the true class."""
    labels_t = torch.as_tensor(labels)
    metrics = classification_metrics(cos.argmax(1).numpy(), labels_t.numpy())
    metrics["clip_score"] = (100 * cos[torch.arange(len(labels)), labels_t]).clamp_min(0).mean().item()
    return metrics

