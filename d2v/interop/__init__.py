"""Checkpoint interop: Hugging Face Data2Vec* models both ways, original fairseq/BEiT data2vec checkpoints in."""
from d2v.interop.checkpoints import export_checkpoint, import_checkpoint
from d2v.interop.fairseq import load_fairseq
from d2v.interop.hf import load_hf
from d2v.interop.hf_export import export_classifier, export_encoder, save_pretrained
from d2v.interop.layouts import InteropError

__all__ = ["InteropError", "export_checkpoint", "export_classifier", "export_encoder", "import_checkpoint",
           "load_fairseq", "load_hf", "save_pretrained"]
