def save_merged(*a, **k): raise NotImplementedError
