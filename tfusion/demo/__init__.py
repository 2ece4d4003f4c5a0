"""The embedded default: `tfusion-demo` trains and evaluates a small Transfusion on CPU with
data shipped inside packages (scikit-learn's handwritten digits, CPython's pydoc pages)."""
