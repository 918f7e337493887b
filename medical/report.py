"""`python -m medical.report runs/medical [--metric test/acc|test/auroc|test/dice]`: table + metric-vs-parameters plot."""
from shared.report import main

if __name__ == "__main__":
    main()
