from server.cli import main

if __name__ == "__main__":  # tensor-parallel workers are spawned and re-import this module as __mp_main__
    main()
