from ckptsurgeon.cli import main

main()
