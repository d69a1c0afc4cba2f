"""amortized-bayes: when does amortized VI reach factorized VI in Bayesian deep generative models,
how much faster is it, and how large is the amortization gap?"""

__version__ = "0.1.0"
