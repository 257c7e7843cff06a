# Installed as the package ``mlpot._csrc`` (see pyproject.toml) so that the C++/CUDA sources of the
# neighbor-list op ship with mlpot and can be compiled on first use. No Python code lives here.
