"""Generates examples/data/credit.csv: a small binary-classification table whose features
live on very different scales (so `normalize = "standard"` matters). Seeded, so the file
is reproducible: python3 examples/data/make_credit.py > examples/data/credit.csv"""
import math
import random

rng = random.Random(20261128)
print("age,income,debt_ratio,late_payments,years_employed,label")
for _ in range(1500):
    age = rng.randint(19, 75)
    income = round(rng.lognormvariate(10.8, 0.45), 2)
    debt = round(min(1.5, max(0.0, rng.gauss(0.35, 0.18))), 4)
    late = min(12, int(rng.expovariate(0.7)))
    years = max(0, min(age - 18, int(rng.gauss((age - 18) * 0.4, 4))))
    score = (
        1.6 * (debt - 0.35) / 0.18
        + 0.9 * late
        - 1.1 * (math.log(income) - 10.8) / 0.45
        - 0.08 * years
        + 0.4 * math.sin(age / 6.0)
        - 0.6
    )
    p = 1.0 / (1.0 + math.exp(-score))
    label = 1 if rng.random() < p else 0
    print(f"{age},{income},{debt},{late},{years},{label}")
