"""One layer's costs of the page-sparse recompute, on random tensors (docs/pages.md): the scripts whose output
is results/pages/layer_costs/output.txt. Run from the repository's root, e.g. python -m benchmark.layer_costs.parts."""
