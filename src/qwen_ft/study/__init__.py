"""The optimizer study: data -> train (x optimizers) -> merge -> eval -> analysis, each phase resumable."""
