"""``python -m mi_crow.store``: the ``mi-crow-store`` command line."""

from mi_crow.store.cli import main

if __name__ == "__main__":
    main()
