"""The layers of ACF, built on ``acf.ops``: spectral normalisation, activations, attention, the log-det
estimators, the contractive block ``x + g(x)``, flow layers and the residual branches. Models
(``acf.models``) are assembled from them; nothing here imports a model or the application."""
