"""Per-token SGTM labels: the one encoding shared by the data path and the masked layers."""

UNLABELED = 0  # U: everything not confidently labelled (incl. undiscovered forget data)
RETAIN = 1  # R: confidently safe and sampled for masking
FORGET = 2  # F: confidently in the forget domain

LABEL_NAMES = {UNLABELED: "U", RETAIN: "R", FORGET: "F"}
