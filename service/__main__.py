from service.app import main

raise SystemExit(main())
