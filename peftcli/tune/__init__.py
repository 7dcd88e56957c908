"""`peftcli tune`: a hyperparameter search over recipe keys, every trial a normal run."""
