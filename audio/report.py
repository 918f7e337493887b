"""`python -m audio.report runs/`: accuracy table (mean +- std over folds) and accuracy-vs-parameters plot."""
from shared.report import main

if __name__ == "__main__":
    main()
