from nanopipe.data.cli import main

main()
