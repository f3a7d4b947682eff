"""Unsupervised Interpretable Basis Extraction (UIBE, paper 04, notebook 04) and its supervised
baseline IBD, scored by S¹/S² through the shared dissection. Reconstructed from the authors' later
papers: `shared/papers/04_unsupervised_interpretable_basis.md` and sections 4-6 and 9 of
`network_dissection_and_broden.md`.

Modules, lowest first (this file only re-exports their public names):
- `detectors`: pixel vectors of a layer (`pixel_matrix`), `Standardizer`, `LinearDetectors` (what every
  basis reduces to for the dissection: rows w and thresholds t, fires ⟺ w·x > t);
- `uibe`: `UIBEConfig`, `UIBEModel`, `uibe_losses`, `fit_uibe` -> `UIBEBasis`;
- `ibd`: `IBDConfig`, `cell_labels`, `fit_ibd` -> `IBDBasis`;
- `metrics`: S¹/S² (closed forms, integrands, exact integrals, per category), `one_hotness`, detection IoUs;
- `planted`: the planted test of shared spec section 9 (`planted_basis_data`, `planted_test`) and its
  repetition over data seeds (`PlantedRun`, `run_planted`);
- `experiment`: `score_basis` (train/val dissections of one basis), `scores_table`, `layer_data` and
  `compare_bases` (natural basis, random rotation, UIBE and IBD on one layer: S¹/S² and one-hotness);
  notebook 04's `UIBESettings` ([uibe]), `subject_networks`, `run_comparisons` over networks and seeds,
  and its tables (`network_table`, `seed_summary`, `concepts_found`, `metric_reduction_check`,
  `directions_grid`, `directions_sensitivity`);
- `claims`: P1 (the planted test) and U1-U5 through the claims kit (`claim_tests`, `claim_results`);
- `figures`: `plot_scores` (S¹/S² bars), `plot_threshold_curves` (their integrands against ξ).
"""
from replication.methods.interpretable_basis.detectors import (LinearDetectors, Standardizer, derived_seed, pixel_matrix,
                                                             shuffled_pixels)
from replication.methods.interpretable_basis.claims import claim_results, claim_tests, one_hot_checks
from replication.methods.interpretable_basis.experiment import (SHUFFLED, BasisComparison, BasisScores, Comparisons, LayerData,
                                                             SubjectNetwork, UIBESettings, compare_bases, concepts_found,
                                                             directions_grid, directions_sensitivity,
                                                             layer_data, metric_reduction_check, network_table,
                                                             run_comparisons, score_basis, scores_table, seed_summary,
                                                             subject_networks)
from replication.methods.interpretable_basis.figures import plot_scores, plot_threshold_curves
from replication.methods.interpretable_basis.ibd import IBDBasis, IBDConfig, cell_labels, fit_ibd, ibd_concepts
from replication.methods.interpretable_basis.metrics import (best_threshold_iou, detection_iou, direction_table,
                                                             integrated_scores, match_detectors, matched_iou,
                                                             one_hotness, s_by_category, s_integrands, s_scores,
                                                             train_labels)
from replication.methods.interpretable_basis.planted import (PlantedConfig, PlantedData, PlantedResult, PlantedRun,
                                                             concept_masks, oracle_recovery_iou, planted_basis_data,
                                                             planted_samples, planted_test, recovery_iou, run_planted)
from replication.methods.interpretable_basis.uibe import (ORTHOGONAL_MAPS, UIBEBasis, UIBEConfig, UIBEModel,
                                                          fit_uibe, uibe_losses)

__all__ = [
    "LinearDetectors", "Standardizer", "derived_seed", "pixel_matrix", "shuffled_pixels",
    "claim_results", "claim_tests", "one_hot_checks",
    "SHUFFLED", "BasisComparison", "BasisScores", "Comparisons", "LayerData", "SubjectNetwork", "UIBESettings", "compare_bases",
    "concepts_found", "directions_grid", "directions_sensitivity", "layer_data", "metric_reduction_check", "network_table", "run_comparisons", "score_basis",
    "scores_table", "seed_summary", "subject_networks",
    "plot_scores", "plot_threshold_curves",
    "IBDBasis", "IBDConfig", "cell_labels", "fit_ibd", "ibd_concepts",
    "best_threshold_iou", "detection_iou", "direction_table", "integrated_scores", "match_detectors", "matched_iou",
    "one_hotness", "s_by_category", "s_integrands", "s_scores", "train_labels",
    "PlantedConfig", "PlantedData", "PlantedResult", "PlantedRun", "concept_masks", "oracle_recovery_iou",
    "planted_basis_data", "planted_samples", "planted_test", "recovery_iou", "run_planted",
    "ORTHOGONAL_MAPS", "UIBEBasis", "UIBEConfig", "UIBEModel", "fit_uibe", "uibe_losses",
]
