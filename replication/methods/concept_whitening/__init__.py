"""Concept whitening (CW, Chen, Bei & Rudin 2020) and the project's hierarchical extension for paper 01
(Hierarchical Semantic Tree Concept Whitening, notebook 01): `shared/papers/01_hierarchical_concept_whitening.md`.

Modules, lowest first (this file only re-exports their public names):
- `whitening`: the CW layer (`ConceptWhitening`: IterNorm whitening, rotation, activation modes,
  alignment gradient, NaN guards), `iternorm_matrix`, `cayley_step`, `replace_with_cw`;
- `alignment`: `ConceptTree` (from a ConceptWorld's `concept_tree.json`), `concept_sets` (crops in
  memory), the objectives (`alignment_targets`: flat H0, ancestor H1) and the step callback `ConceptAlignment`;
- `metrics`: purity AUC per node, best-unit baseline, similarity matrix Q and its branch summary, axis
  correlation, concept importance, top images, dissection labels of the axes;
- `experiment`: notebook 01's `CWSettings` ([cw]), `subjects`, `FinetuneRecipe`, `finetune`,
  `evaluate_network`, `run_study` and its tables (with `alignment_trace`, every rotation update);
- `claims`: T1-T6 through the claims kit; `figures`: the CW paper's figures adapted.
"""
from replication.methods.concept_whitening.alignment import (OBJECTIVES, ConceptAlignment, ConceptSets, ConceptTree,
                                                             alignment_targets, concept_sets, node_table)
from replication.methods.concept_whitening.claims import claim_results, claim_tests, leaf_rows, rotation_check
from replication.methods.concept_whitening.experiment import (VARIANT_NAMES, VARIANTS, CWSettings, Evaluation,
                                                              FinetuneRecipe, Finetuned, Study, Subject, TaskData,
                                                              alignment_trace, dissection_table, evaluate_network, finetune,
                                                              importance_table, run_study, subjects)
from replication.methods.concept_whitening.figures import (plot_alignment_trace, plot_auc, plot_correlation,
                                                           plot_similarity, plot_top_images)
from replication.methods.concept_whitening.metrics import (axis_correlation, axis_labels, axis_scores, best_units,
                                                           branch_similarity, concept_importance, layer_outputs,
                                                           purity_auc, similarity_matrix, similarity_summary,
                                                           top_images)
from replication.methods.concept_whitening.whitening import (ACTIVATION_MODES, CayleyResult, ConceptWhitening,
                                                             alignment_gradient, axis_activations, cayley_step,
                                                             check_orthogonal, iternorm_matrix, replace_with_cw)

__all__ = [
    "OBJECTIVES", "ConceptAlignment", "ConceptSets", "ConceptTree", "alignment_targets", "concept_sets", "node_table",
    "claim_results", "claim_tests", "leaf_rows", "rotation_check",
    "VARIANT_NAMES", "VARIANTS", "CWSettings", "Evaluation", "FinetuneRecipe", "Finetuned", "Study", "Subject",
    "TaskData", "alignment_trace", "dissection_table", "evaluate_network", "finetune", "importance_table", "run_study", "subjects",
    "plot_alignment_trace", "plot_auc", "plot_correlation", "plot_similarity", "plot_top_images",
    "axis_correlation", "axis_labels", "axis_scores", "best_units", "branch_similarity", "concept_importance",
    "layer_outputs", "purity_auc", "similarity_matrix", "similarity_summary", "top_images",
    "ACTIVATION_MODES", "CayleyResult", "ConceptWhitening", "alignment_gradient", "axis_activations", "cayley_step",
    "check_orthogonal", "iternorm_matrix", "replace_with_cw",
]
