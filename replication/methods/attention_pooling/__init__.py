"""LAP, Local Attention Pooling (paper 02, notebook 02): an attention-based pooling layer whose maps are the
network's own explanation, plugged into trained CNNs, with knowledge-injection losses; compared with
captum's and zennit's explainers on ConceptWorld's evidence masks. Spec: `shared/papers/02_local_attention_pooling.md`
(only the abstracts are known: every choice is a stated parameter).

Modules, lowest first (this file only re-exports their public names):
- `layer`: `LAP2d` (attention block, window weights `gauss_max` / `softmax` / `tf_third_party`, learnable
  sharpness, split or mean heads; the weights it pooled with), `insert_lap` (through `models.surgery`),
  `layer_maps`, `combine_maps`, `interpretation_map`, `pooling_departure`;
- `losses`: `WeakEvidenceLoss` (image-level positive and negative evidence), `MaskInjectionLoss` (evidence
  masks), `AttentionSparsity`: training-loop loss terms;
- `experiment`: `LAPSettings` ([lap]), `EvidenceSet`, `subject_networks`, `LAPRecipe` / `train_lap`,
  `explain_all`, `map_metrics`, `injection_validity`, `sanity_table`, `run_experiment` -> `Runs`, summaries;
- `claims`: L1-L8 through the claims kit; `figures`: `plot_maps`, `plot_curves`.
"""
from replication.methods.attention_pooling.claims import claim_results, claim_tests, sanity_passes, unlearned_networks
from replication.methods.attention_pooling.experiment import (CONTROL, EXPLAINERS, LAP_MAPS, VARIANTS, EvidenceSet, LAPConfig,
                                                              LAPRecipe, LAPSettings, Runs, Subject, accuracy_summary,
                                                              explain_all, explained_subset, gradcam_layer, injection_validity,
                                                              lap_explainer, map_head, map_metrics, metrics_summary, run_experiment,
                                                              sanity_table, state_fingerprint, subject_networks, train_lap)
from replication.methods.attention_pooling.figures import plot_curves, plot_maps
from replication.methods.attention_pooling.layer import (COMBINE_RULES, HEAD_MODES, WEIGHT_MODES, AttentionBlock, LAP2d,
                                                         combine_maps, insert_lap, interpretation_map, lap_layers,
                                                         layer_maps, pooling_departure)
from replication.methods.attention_pooling.losses import AttentionSparsity, MaskInjectionLoss, WeakEvidenceLoss

__all__ = [
    "claim_results", "claim_tests", "sanity_passes", "unlearned_networks",
    "CONTROL", "EXPLAINERS", "LAP_MAPS", "VARIANTS", "EvidenceSet", "LAPConfig", "LAPRecipe", "LAPSettings", "Runs", "Subject",
    "accuracy_summary", "explain_all", "explained_subset", "gradcam_layer", "injection_validity", "lap_explainer", "map_head", "map_metrics",
    "metrics_summary", "run_experiment", "sanity_table", "state_fingerprint", "subject_networks", "train_lap",
    "plot_curves", "plot_maps",
    "COMBINE_RULES", "HEAD_MODES", "WEIGHT_MODES", "AttentionBlock", "LAP2d", "combine_maps", "insert_lap",
    "interpretation_map", "lap_layers", "layer_maps", "pooling_departure",
    "AttentionSparsity", "MaskInjectionLoss", "WeakEvidenceLoss",
]
