from traice.cli import main

main()
