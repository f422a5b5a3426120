-- The 2409 hotfix rollup applies only to a 2409 site (build 9132).
SELECT CASE
    WHEN dbo.fnCurrentSiteVersion_INT() = 5009132 THEN 1
    ELSE PRINT('Not a 2409 build, skip this hotfix')
END AS Applicable;
