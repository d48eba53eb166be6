if __name__ != "hai.configs":  # imported as a bare `configs` from the checkout root: see hai/_shadow.py
    from hai._shadow import step_aside

    step_aside(__name__, __file__)
